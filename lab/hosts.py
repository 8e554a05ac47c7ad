"""The two-host lab shared by `make demo`, `make bench` and the end-to-end tests.

Root only. Host A and host B are network namespaces joined by a veth pair
(the underlay, 198.18.0.0/16). Each runs the whole stack the way a
production host does:

* ``l3ptp-helper`` as its own unprivileged uid holding only CAP_NET_ADMIN and CAP_BPF
  (ambient, as systemd's ``User=`` + ``AmbientCapabilities=`` would give it),
  with a root-owned policy file;
* ``l3ptp-controller`` and its workers as a second uid with no capability;
  both uids share one group, which owns the helper socket.

The uids come from the range systemd keeps for dynamic users and are picked
free (no passwd entry, no process), so nothing is added to the system. The
tunnel is dual-stack (198.19.0.0/16 and fd00::/8) with ``queues`` queues;
each host has a prefix on its loopback that it advertises and the other
accepts, so installed routes are exercised too.

No ``ip`` command anywhere: namespaces through pyroute2.netns, links and
addresses through netlink, processes enter their namespace with setns(2) in
the child between fork and exec. ping and iperf3 are the only external
programs run, and only inside the lab's namespaces. Every process is
started by the lab and stopped by PID; `close()` (also on Ctrl-C) removes
the namespaces, which takes the veth, the TUN devices and their routes with
them, and the work directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lab.interrupts import Interrupts
from lab.netns import enter, netlink, setns
from lab.procs import DYNAMIC_ID_RANGE, alive, free_ids, tun_open_to_all, workers_in
from lab.tools import LabTools
from lab.topology import (BASE_PORT, BEHIND, NETWORK, OVERLAY4, OVERLAY6, REMOTE4, REMOTE6, UNDERLAY, UNDERLAY6,
                          UNDERLAY6_PREFIXLEN, UNDERLAY_PREFIXLEN, Host, LabError, behind_prefixes, toml_text)

#: Variables of the harness's own environment that every process it starts gets too: `L3PTP_NATIVE=0` runs the
#: workers on the pure-Python reference instead of the C module (worker/native.py), for A/B runs of the bench.
PASSED_ENV = ("L3PTP_NATIVE",)
IFA_F_NODAD = 0x02  # linux/if_addr.h

# Re-exported: the lab's users (tests, demo, bench) take the lab's vocabulary from here.
__all__ = ["BASE_PORT", "BEHIND", "DYNAMIC_ID_RANGE", "NETWORK", "REMOTE4", "REMOTE6", "Host", "Interrupts", "Lab",
           "LabError", "behind_prefixes", "free_ids", "netlink", "setns", "workers_in"]


class Lab(LabTools):
    """Two namespaces, one tunnel; see the module docstring.

    Use as a context manager, or call `close()` yourself: it is idempotent
    and safe after any partial `build()`.
    """

    def __init__(
        self,
        *,
        queues: int = 2,
        engine: str = "auto",
        workdir: str | None = None,
        say: Callable[[str], None] | None = None,
        python: str | None = None,
        underlay_via_default_route: bool = False,
        underlay_ipv6: bool = False,
        config_a: dict[str, Any] | None = None,
        config_b: dict[str, Any] | None = None,
        policy_extra: dict[str, Any] | None = None,
    ) -> None:
        self.queues = queues
        self.engine = engine
        self.say = say or (lambda line: None)
        self.python = python or sys.executable
        self.underlay_via_default_route = underlay_via_default_route
        self.underlay_ipv6 = underlay_ipv6
        self.policy_extra = policy_extra or {}
        self.tag = secrets.token_hex(3)
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"l3ptp-lab-{self.tag}-")
        self.hosts: dict[str, Host] = {}
        for i, name in enumerate("ab"):
            self.hosts[name] = Host(
                name=name,
                netns=f"l3ptp-{self.tag}-{name}",
                dir=os.path.join(self.workdir, name),
                underlay=(UNDERLAY6 if underlay_ipv6 else UNDERLAY)[i],
                overlay4=OVERLAY4[i],
                overlay6=OVERLAY6[i],
                config_extra=dict((config_a if name == "a" else config_b) or {}),
            )
        self.helper_uid = self.controller_uid = self.gid = -1
        self._netns_made: list[str] = []
        #: Every PID the lab started, for the leftover check after close().
        self._started: list[int] = []
        self._closed = False

    # ---- context manager ------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def started(cls, *, wait: float = 40.0, **kw: Any) -> Iterator[Lab]:
        """Build and start a lab, yield it, close it: the body of a test module's lab fixture."""
        lab = cls(**kw)
        try:
            lab.build()
            lab.start(wait=wait)
            yield lab
        finally:
            lab.close()

    # ---- building ----------------------------------------------------------------

    def build(self) -> None:
        """Namespaces, veth underlay, ids, keys, policies and configurations."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, TUN devices, other uids)")
        self.helper_uid, self.controller_uid, self.gid = free_ids(3)
        if not tun_open_to_all():
            # /dev/net/tun is root-only here (not Debian's 0666): the helper
            # runs as uid 0 with every capability but CAP_NET_ADMIN dropped.
            self.helper_uid = 0
        os.chmod(self.workdir, 0o711)
        self._check_python_reachable()
        self._make_namespaces()
        self._write_files()

    def _check_python_reachable(self) -> None:
        """The unprivileged uids must be able to run our interpreter and import the package."""
        probe = [self.python, "-c", "import l3ptp.controller.app, l3ptp.worker.app, l3ptp.helper.dispatch"]
        hint = ("the virtual environment or the checkout is in a directory other users cannot read "
                "(such as /root): run it through `make demo` / `make test`, which then put the "
                "environment under /var/lib/l3ptp-dev, or clone into a directory others can read")
        try:
            res = subprocess.run(
                probe, capture_output=True, text=True, timeout=60,
                user=self.controller_uid, group=self.gid, extra_groups=[], cwd="/",
            )
        except OSError as exc:  # exec itself refused: the interpreter's path is not traversable
            raise LabError(f"an unprivileged uid cannot run {self.python} ({exc.strerror}): {hint}") from None
        if res.returncode != 0:
            last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"
            raise LabError(f"an unprivileged uid cannot import l3ptp with {self.python} ({last}): {hint}")

    def _make_namespaces(self) -> None:
        from pyroute2 import netns

        for host in self.hosts.values():
            netns.create(host.netns)
            self._netns_made.append(host.netns)
        self.say(f"namespaces {self.a.netns} and {self.b.netns}")
        with netlink(self.a.netns) as ipr:
            ipr.link("add", ifname="under0", kind="veth", peer={"ifname": "under0", "net_ns_fd": self.b.netns})
        for host, peer in ((self.a, self.b), (self.b, self.a)):
            with netlink(host.netns) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                idx = ipr.link_lookup(ifname="under0")[0]
                if self.underlay_ipv6:  # no duplicate address detection: usable at once
                    ipr.addr("add", index=idx, address=host.underlay, prefixlen=UNDERLAY6_PREFIXLEN, flags=IFA_F_NODAD)
                else:
                    plen = 32 if self.underlay_via_default_route else UNDERLAY_PREFIXLEN
                    ipr.addr("add", index=idx, address=host.underlay, prefixlen=plen)
                ipr.link("set", index=idx, state="up")
                if self.underlay_via_default_route:
                    # The peer is reachable only through a default route, so
                    # a tunnel default route would loop without the fwmark rule.
                    ipr.route("add", dst="0.0.0.0/0", oif=idx, scope=253)
                v4, v6 = BEHIND[host.name]
                ipr.addr("add", index=lo, address=v4, prefixlen=32)
                ipr.addr("add", index=lo, address=v6, prefixlen=128)
        self.say(f"underlay veth {self.a.underlay} <-> {self.b.underlay}")

    def _write_files(self) -> None:
        from l3ptp.worker import keys

        for host in self.hosts.values():
            os.makedirs(host.dir, mode=0o711)
            for sub, owner, mode in (("helper", self.helper_uid, 0o750), ("run", self.controller_uid, 0o700),
                                     ("etc", self.controller_uid, 0o700)):
                path = os.path.join(host.dir, sub)
                os.makedirs(path)
                os.chown(path, owner, self.gid)
                os.chmod(path, mode)
            key = keys.generate_private_key()
            key_path = os.path.join(host.dir, "etc", "node.key")
            keys.save_private_key(key, key_path)
            os.chown(key_path, self.controller_uid, self.gid)
            host.fingerprint = keys.fingerprint(key)
            host.runtime_dir = os.path.join(host.dir, "run", "ctl")
            host.helper_socket = os.path.join(host.dir, "helper", "helper.sock")
            # Root-owned, read by the helper only.
            host.policy_path = os.path.join(host.dir, "helper-policy.toml")
            policy = {
                "controller_uids": [self.controller_uid],
                "worker_uids": [self.controller_uid],
                "socket_group": self.gid,
                "socket_path": host.helper_socket,
                "interface_prefix": "l3p-",
                "allowed_prefixes": ["198.19.0.0/16", "fd00::/8"],
            }
            policy.update(self.policy_extra)
            with open(host.policy_path, "w") as f:
                f.write(toml_text({"": policy}))
            os.chmod(host.policy_path, 0o644)
        for host, peer in ((self.a, self.b), (self.b, self.a)):
            net: dict[str, Any] = {
                "role": "listen" if host is self.a else "connect",
                "queues": self.queues,
                "local_ipv4": f"{host.overlay4}/30",
                "peer_ipv4": f"{peer.overlay4}/30",
                "local_ipv6": f"{host.overlay6}/64",
                "peer_ipv6": f"{peer.overlay6}/64",
                "advertised_routes": behind_prefixes(host.name),
                "accepted_routes": behind_prefixes(peer.name),
                "keepalive_interval": 1.0,
                "peer_key": peer.fingerprint,
            }
            if self.engine != "auto":
                net["engine"] = self.engine
            underlay: dict[str, Any] = {"port": BASE_PORT}
            if host is self.a:
                underlay |= {"local": host.underlay, "peer": peer.underlay}
            else:
                underlay |= {"peer": peer.underlay}
            # Tables (but the underlay) go in as sub-tables of the network: `reality` for instance.
            net.update({k: v for k, v in host.config_extra.items() if k != "underlay"})
            underlay.update(host.config_extra.get("underlay", {}))
            underlay = {k: v for k, v in underlay.items() if v is not None}  # None in config_extra: leave it out
            host.config_path = os.path.join(host.dir, "etc", "l3ptp.toml")
            self.write_config(host, net, underlay)

    def write_config(self, host: Host, net: dict[str, Any], underlay: dict[str, Any],
                     networks: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None) -> None:
        """(Re)write `host`'s configuration: network `demo` plus any extra `networks`."""
        host.network, host.underlay_table = dict(net), dict(underlay)
        tables: dict[str, dict[str, Any]] = {
            "node": {"id": f"lab-{host.name}", "key_file": os.path.join(host.dir, "etc", "node.key")},
            "controller": {"runtime_dir": host.runtime_dir, "helper_socket": host.helper_socket},
            "metrics": {"enabled": False},
            f"networks.{NETWORK}": net,
            f"networks.{NETWORK}.underlay": underlay,
        }
        for name, (n, u) in (networks or {}).items():
            tables[f"networks.{name}"] = n
            tables[f"networks.{name}.underlay"] = u
        tmp = host.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(toml_text(tables))
        os.chown(tmp, self.controller_uid, self.gid)
        os.chmod(tmp, 0o600)
        os.replace(tmp, host.config_path)

    # ---- processes --------------------------------------------------------------

    def spawn(self, host: Host, what: str, argv: list[str], *, preexec: Callable[[], None] | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host` (as root unless `preexec` says otherwise), logging to `what`.log.

        Recorded as ``host.procs[what]``; `close()` stops it if its owner does not.
        """
        log_path = os.path.join(host.dir, f"{what}.log")
        log = open(log_path, "ab")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               **{name: os.environ[name] for name in PASSED_ENV if name in os.environ}, **(env or {})}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=preexec or enter(host.netns), env=env, cwd="/",
                                    start_new_session=True)
        finally:
            log.close()
        host.procs[what] = proc
        host.logs[what] = log_path
        self._started.append(proc.pid)
        return proc

    def start_helper(self, host: Host, *, wait: float = 20.0) -> subprocess.Popen[bytes]:
        """l3ptp-helper with CAP_NET_ADMIN and CAP_BPF only (its own uid, or uid 0 if /dev/net/tun is root-only)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.helper_socket)
        proc = self.spawn(host, "helper", [self.python, "-m", "l3ptp.helper", "--policy", host.policy_path],
                          preexec=enter(host.netns, self.helper_uid, self.gid, net_admin_only=True))
        deadline = time.monotonic() + wait
        while not os.path.exists(host.helper_socket):
            if proc.poll() is not None:
                raise LabError(f"helper on host {host.name} exited with {proc.returncode}:\n{self.tail(host, 'helper')}")
            if time.monotonic() > deadline:
                raise LabError(f"helper on host {host.name} did not open its socket within {wait:g}s")
            time.sleep(0.05)
        return proc

    def cleanup_helper(self, host: Host, *, timeout: float = 60.0) -> int:
        """`l3ptp-helper --cleanup` in `host` (what the package's prerm runs on removal): its exit status."""
        proc = self.spawn(host, "cleanup", [self.python, "-m", "l3ptp.helper", "--policy", host.policy_path,
                                            "--cleanup"],
                          preexec=enter(host.netns, self.helper_uid, self.gid, net_admin_only=True))
        return proc.wait(timeout)

    def start_controller(self, host: Host, *, wait: float = 20.0) -> subprocess.Popen[bytes]:
        """l3ptp-controller (and so its workers) as an unprivileged uid with no capability."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.control_socket)
        proc = self.spawn(host, "controller",
                          [self.python, "-m", "l3ptp.controller", "--config", host.config_path],
                          preexec=enter(host.netns, self.controller_uid, self.gid))
        deadline = time.monotonic() + wait
        while True:
            if proc.poll() is not None:
                raise LabError(
                    f"controller on host {host.name} exited with {proc.returncode}:\n{self.tail(host, 'controller')}")
            if os.path.exists(host.control_socket):
                with contextlib.suppress(LabError):
                    self.status(host)
                    return proc
            if time.monotonic() > deadline:
                raise LabError(f"controller on host {host.name} not answering within {wait:g}s:\n"
                               f"{self.tail(host, 'controller')}")
            time.sleep(0.1)

    def start(self, *, wait: float = 30.0) -> None:
        """Helpers, then controllers, on both hosts; wait for every queue to be established."""
        for host in self.hosts.values():
            self.start_helper(host)
            self.say(f"host {host.name}: helper up (pid {host.procs['helper'].pid}, CAP_NET_ADMIN and CAP_BPF only)")
        for host in self.hosts.values():
            self.start_controller(host)
            self.say(f"host {host.name}: controller up (pid {host.procs['controller'].pid}, no capabilities)")
        self.wait_established(wait)

    def stop_process(self, host: Host, what: str, *, sig: int = signal.SIGTERM, wait: float = 20.0) -> int | None:
        """Signal the process the lab started as `what` on `host`; wait for it; return its exit status."""
        proc = host.procs.get(what)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def stop_controller(self, host: Host, *, handover: bool = False, sig: int = signal.SIGTERM,
                        wait: float = 20.0) -> int | None:
        """Stop `host`'s controller in order (SIGTERM: it hands its workers over, they keep the tunnel up
        for HANDOVER_GRACE). With `handover` False (a stop for good, as before a teardown) the workers
        it ran are then stopped too, by PID (SIGTERM: CLOSE to the peer; SIGKILL after `wait`)."""
        workers = workers_in(host.netns, spares=True) if not handover else []
        code = self.stop_process(host, "controller", sig=sig, wait=wait)
        for pid in workers:
            self._started.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in workers:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code

    def stop(self) -> dict[str, int | None]:
        """Orderly stop for good: controllers first (then the workers they handed over, by PID: CLOSE to
        the peer; the networks stay in the helpers), then helpers."""
        codes = {}
        for host in self.hosts.values():
            codes[f"{host.name}.controller"] = self.stop_controller(host)
        for host in self.hosts.values():
            codes[f"{host.name}.helper"] = self.stop_process(host, "helper")
        return codes

    # ---- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process the lab started (by PID), remove namespaces and the work directory."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for what in [w for w in host.procs if w.startswith("tool-")]:
                proc = host.procs[what]
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(Exception):
                    proc.communicate(timeout=5)
        with contextlib.suppress(Exception):
            self.stop()
        for host in self.hosts.values():  # anything else started through spawn()
            for what in list(host.procs):
                with contextlib.suppress(Exception):
                    self.stop_process(host, what, wait=10)
            for pid in workers_in(host.netns, spares=True):  # outlived a controller the test killed
                self._started.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        from pyroute2 import netns

        for name in self._netns_made:
            with contextlib.suppress(Exception):
                netns.remove(name)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close_checked(self, pids: Iterable[int] = (), extra_paths: Iterable[str] = ()) -> list[str]:
        """`close()` with Ctrl-C held off (a second one must not cut the cleanup short), then
        what is left behind: our namespaces, live processes among those the lab started and
        `pids`, the work directory and `extra_paths`. Empty when the cleanup was complete."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.close()
        finally:
            signal.signal(signal.SIGINT, old)
        left = [f"namespace {h.netns}" for h in self.hosts.values() if os.path.exists(f"/run/netns/{h.netns}")]
        left += [f"process {pid}" for pid in sorted({*self._started, *pids}) if alive(pid)]
        own = [self.workdir] if self._own_workdir else []
        left += [f"path {p}" for p in (*own, *extra_paths) if os.path.exists(p)]
        return left
