# l3ptp developer entry points. Both main targets work on a fresh Debian
# machine as root: they install what they need themselves.
SHELL := /bin/bash
# The demo and the privileged tests run the controllers and workers as other,
# unprivileged uids: they must be able to run the environment's interpreter
# and read the l3ptp package. In a checkout they can read, the environment is
# .venv here with l3ptp installed editable. In a checkout they cannot read (a
# clone under /root, mode 0700, say) it lives in /var/lib/l3ptp-dev/<hash of
# this path>/venv with l3ptp installed as a copy, re-installed by make
# whenever a source file changes.
# The harness (lab/: namespaces, demo, bench, booted machines) is not part of
# the package: it runs as root from this checkout (python -m lab.demo), and
# the processes it starts as other uids run only the installed l3ptp.
PRIVATE_CHECKOUT := $(shell [ "$$(id -u)" = 0 ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups \
                      test -r '$(CURDIR)/pyproject.toml' 2>/dev/null && echo yes)
ifeq ($(PRIVATE_CHECKOUT),yes)
VENV ?= /var/lib/l3ptp-dev/$(shell printf %s '$(CURDIR)' | sha256sum | cut -c1-12)/venv
PKG_SOURCES := $(shell find helper worker controller ipc -name '*.py')
INSTALL_PKG = $(PY) -m pip install -q '.[test,fast]' && $(PY) -m pip install -q --no-deps --force-reinstall .
else
VENV ?= .venv
PKG_SOURCES :=
# setuptools says "Editable installation" (a notice, not a problem) on every
# editable install: not what a user of make demo needs to read.
INSTALL_PKG = PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[test,fast]'
endif
PY := $(VENV)/bin/python
# Debian's interpreter: the demo runs the controller and workers as other,
# unprivileged uids, which cannot run an interpreter kept under /root (pyenv).
PYTHON_BASE ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
# Debian packages the test suite and the demo use.
DEBS := iproute2 iputils-ping iperf3 procps systemd dpkg-dev debhelper lintian fakeroot gcc python3.11-dev python3-pip python3-setuptools python3-wheel python3-venv dbus-daemon polkitd systemd-container mmdebstrap

.PHONY: test demo bench deps venv clean

deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: not root, cannot install$$missing (privileged tests will skip)"; fi; \
	fi

$(VENV)/.installed: pyproject.toml setup.py worker/_fastpath.c $(PKG_SOURCES)
	@if [ "$(PRIVATE_CHECKOUT)" = yes ]; then \
	  echo "this checkout is private to root: the environment the unprivileged demo/test uids run goes to $(VENV)"; fi
	umask 022 && $(PYTHON_BASE) -m venv $(VENV)
	umask 022 && $(PY) -m pip install -q --upgrade 'pip>=23' 'setuptools>=77' wheel
	umask 022 && $(INSTALL_PKG)
	touch $@

venv: $(VENV)/.installed

## make test: the whole suite (privileged tests run when root; mandatory in CI)
test: deps venv
	$(PY) -m pytest

## make demo: a dual-stack tunnel between two network namespaces: ping, iperf3, status, full cleanup (DEMO_ARGS="--queues 4")
demo: deps venv
	cd $(CURDIR) && $(PY) -m lab.demo $(DEMO_ARGS)

## make bench: l3ptp against veth, OpenVPN and wireguard-go in two namespaces (BENCH_ARGS="--seconds 5 --queues 1,2")
bench: deps venv
	cd $(CURDIR) && $(PY) -m lab.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
	@if [ "$(PRIVATE_CHECKOUT)" = yes ]; then rmdir --ignore-fail-on-non-empty $(dir $(VENV)); fi
