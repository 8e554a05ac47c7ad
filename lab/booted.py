"""Booted Debian machines for tests and for people: mmdebstrap + systemd-nspawn --boot.

A bookworm minbase root file system with systemd, dbus, polkitd and the
tools the tests use is built once with ``mmdebstrap`` and cached as a tar file
in ``/var/cache/l3ptp-test/`` (``L3PTP_BOOTED_CACHE``), keyed on the suite and
the package list. `machine_pair()` unpacks two copies, makes two network
namespaces joined by one veth pair (the underlay, 198.18.0.1/24 and
198.18.0.2/24, device ``ul0`` on both sides) and boots each tree with
``systemd-nspawn --boot`` inside its namespace, with ``CAP_NET_ADMIN`` (lost
otherwise when the namespace is given by path) and ``CAP_BPF`` with the
``bpf`` system call (the helper's shared-port steering program; neither is in
nspawn's default set) and a ``/dev/net/tun`` node of
its own bound in (mode 0666 like stock Debian, or 0600 like some hosts).
Everything needed comes from Debian's ``systemd-container`` and
``mmdebstrap`` packages (docs/packaging.md, "Booted-machine tests").

Every machine, namespace and temporary tree is removed on success, failure
and Ctrl-C: the context managers clean up in ``finally``, and an ``atexit``
hook stops whatever is still running when the interpreter exits (for example
after pytest was interrupted between fixtures). Names carry a random suffix,
so parallel runs never collide.

For people::

    python -m lab.booted build          # build (or show) the cached tree
    python -m lab.booted up [--deb F]   # boot two machines, print how to enter them, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
#: What every booted machine has. python3.11 (and the rest of the .deb's
#: Depends: iproute2, systemd) are in it so that ``apt-get install ./l3ptp.deb``
#: needs no network inside the machine.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "polkitd", "iproute2", "procps", "iputils-ping", "iperf3",
    "python3.11",
)
CACHE = Path(os.environ.get("L3PTP_BOOTED_CACHE", "/var/cache/l3ptp-test"))
WORK = Path(os.environ.get("L3PTP_BOOTED_WORK", "/var/tmp"))
UNDERLAY = ("198.18.0.1", "198.18.0.2")
UNDERLAY_PREFIX = 24
UNDERLAY_DEV = "ul0"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "ip", "tar")


class BootError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


# ---- the cached root file system ---------------------------------------------------------------

def rootfs_tarball(packages: Sequence[str] = PACKAGES, *, suite: str = SUITE, cache: Path = CACHE,
                   log: bool = False) -> Path:
    """The cached ``mmdebstrap --variant=minbase`` tar of `suite` with `packages`; built when missing.

    The key is a hash of the suite and the sorted package list. A lock file
    serialises concurrent builds; the tar appears under its final name only
    when complete.
    """
    key = hashlib.sha256(f"{suite}\n{','.join(sorted(packages))}".encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{suite}-minbase-{key}.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        partial = cache / f".partial-{secrets.token_hex(4)}-{tarball.name}"  # mmdebstrap picks the format from ".tar"
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(sorted(packages))}",
               "--quiet", suite, str(partial)]
        try:
            proc = subprocess.run(cmd, capture_output=not log, text=True, timeout=900)
            if proc.returncode != 0:
                raise BootError(f"mmdebstrap failed ({proc.returncode}): {(proc.stderr or '')[-3000:]}")
            partial.rename(tarball)
        finally:
            partial.unlink(missing_ok=True)
    return tarball


# ---- machines ------------------------------------------------------------------------------------

_LIVE: list[Machine | Underlay] = []


@atexit.register
def _cleanup_leftovers() -> None:
    for thing in reversed(list(_LIVE)):
        with contextlib.suppress(Exception):
            thing.close()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise BootError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Underlay:
    """Two network namespaces joined by one veth pair (``ul0`` in each)."""

    suffix: str
    names: list[str] = field(default_factory=list)

    def create(self) -> Underlay:
        _LIVE.append(self)
        for side in ("a", "b"):
            name = f"l3ptp-boot-{self.suffix}-{side}"
            _ip("netns", "add", name)
            self.names.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        a, b = self.names
        _ip("-n", a, "link", "add", UNDERLAY_DEV, "type", "veth", "peer", "name", UNDERLAY_DEV, "netns", b)
        for name, addr in zip(self.names, UNDERLAY, strict=True):
            _ip("-n", name, "addr", "add", f"{addr}/{UNDERLAY_PREFIX}", "dev", UNDERLAY_DEV)
            _ip("-n", name, "link", "set", UNDERLAY_DEV, "up")
        return self

    def close(self) -> None:
        for name in reversed(self.names):
            _ip("netns", "del", name, check=False)
        self.names.clear()
        if self in _LIVE:
            _LIVE.remove(self)


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _comm(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return ""


class Machine:
    """One booted Debian machine: a tree under WORK, an nspawn process, its init's pid."""

    def __init__(self, name: str, netns: str, tarball: Path, *, tun_mode: int = 0o666) -> None:
        self.name = name
        self.netns = netns
        self.tun_mode = tun_mode
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=WORK))
        self.root = self.dir / "root"
        self.tun = self.dir / "tun"
        self.console = self.dir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        _LIVE.append(self)
        self.root.mkdir()
        subprocess.run(["tar", "-C", str(self.root), "-xf", str(tarball)], check=True, timeout=300)
        (self.root / "etc/hostname").write_text(f"{name}\n")
        os.mknod(self.tun, 0o020000 | tun_mode, os.makedev(10, 200))
        os.chmod(self.tun, tun_mode)

    def boot(self, timeout: float = 90.0) -> Machine:
        cmd = ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit", "-q",
               f"--machine={self.name}", f"--network-namespace-path=/run/netns/{self.netns}",
               "--capability=CAP_NET_ADMIN,CAP_BPF", "--system-call-filter=bpf", f"--bind={self.tun}:/dev/net/tun", "--console=read-only"]
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise BootError(f"{self.name}: systemd-nspawn exited {self.proc.returncode}: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise BootError(f"{self.name}: no init process after {timeout:.0f} s: {self.console_tail()}")
            self.leader = self._find_init()
            time.sleep(0.2)
        # Until the guest's manager listens, systemctl fails at once: ask again.
        state = ""
        while state not in ("running", "degraded"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise BootError(f"{self.name}: system state {state!r}: {self.console_tail()}")
            try:
                state = self.run("systemctl is-system-running --wait", check=False, timeout=left).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "timeout"
            if state not in ("running", "degraded"):
                time.sleep(0.5)
        return self

    def _find_init(self) -> int:
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            for child in _children(pid):
                if _comm(child) == "systemd":
                    return child
                todo.append(child)
        return 0

    def console_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_bytes()[-n:].decode(errors="replace")
        return ""

    # -- running things inside ---------------------------------------------------------------

    def run(self, cmd: str | Sequence[str], *, user: str | None = None, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` (a shell string or an argv) in the machine, as root or as `user` (runuser)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        full = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", f"PATH={GUEST_PATH}", "LANG=C.UTF-8",
                "HOME=/root", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *argv]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
            raise BootError(f"{self.name}: `{shown}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def path(self, guest_path: str) -> Path:
        """The host path of `guest_path` (not under the guest's /tmp, /run, /dev: those are its own mounts)."""
        return self.root / guest_path.lstrip("/")

    # -- stopping ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the guest to power off (nspawn forwards SIGTERM to its init as a halt request)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self, grace: float = 10.0) -> None:
        """Stop the machine (a clean halt for `grace` s, then nspawn's immediate termination) and remove it."""
        if self.proc is not None and self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # A second SIGTERM: nspawn terminates the container at once and still cleans up.
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        self.proc = None
        self.leader = 0
        # nspawn's mounts live in its own mount namespace and end with it;
        # make sure nothing under the tree is mounted here before removing it.
        with open("/proc/self/mountinfo") as f:
            mounted = [line.split()[4] for line in f if line.split()[4].startswith(str(self.dir) + "/")]
        for point in sorted(mounted, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)


@dataclass
class Pair:
    alpha: Machine
    beta: Machine
    underlay: Underlay

    @property
    def machines(self) -> tuple[Machine, Machine]:
        return (self.alpha, self.beta)


@contextlib.contextmanager
def machine_pair(*, tun_modes: tuple[int, int] = (0o666, 0o666), tarball: Path | None = None,
                 boot_timeout: float = 90.0) -> Iterator[Pair]:
    """Two booted machines (alpha 198.18.0.1, beta 198.18.0.2) joined by a veth underlay; removed on exit."""
    suffix = secrets.token_hex(3)
    tarball = tarball or rootfs_tarball()
    underlay = Underlay(suffix)
    machines: list[Machine] = []
    try:
        underlay.create()
        for label, netns, mode in zip(("alpha", "beta"), underlay.names, tun_modes, strict=True):
            machines.append(Machine(f"l3ptp-{label}-{suffix}", netns, tarball, tun_mode=mode))
        for m in machines:
            m.boot(boot_timeout)
        yield Pair(machines[0], machines[1], underlay)
    finally:
        for m in machines:
            m.request_stop()  # both halt in parallel
        for m in reversed(machines):
            m.close()
        underlay.close()


# ---- the package under test ----------------------------------------------------------------------

def build_deb(outdir: Path, *, lintian: bool = True, timeout: float = 1100) -> Path:
    """packaging/build-deb.sh into `outdir`; returns the .deb."""
    env = dict(os.environ, TMPDIR=str(outdir), L3PTP_LINTIAN="1" if lintian else "0")
    dist = outdir / "dist"
    proc = subprocess.run([str(ROOT / "packaging/build-deb.sh"), str(dist)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise BootError(f"build-deb.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    (deb,) = dist.glob("l3ptp_*.deb")
    return deb


def with_version(deb: Path, version: str, outdir: Path) -> Path:
    """The same package rebuilt by dpkg-deb with Version `version` (an upgrade candidate).

    The payload and maintainer scripts are the checkout's; only the control
    file's version changes, so nothing is committed for it.
    """
    tree = outdir / f"repack-{version}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=300)
    control = tree / "DEBIAN/control"
    lines = [f"Version: {version}" if line.startswith("Version:") else line
             for line in control.read_text().splitlines()]
    control.write_text("\n".join(lines) + "\n")
    arch = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Architecture:"))
    out = outdir / f"l3ptp_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(tree), str(out)], check=True,
                   capture_output=True, timeout=600)
    shutil.rmtree(tree)
    return out


# ---- command line ----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.booted", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached root file system and print its path")
    up = sub.add_parser("up", help="boot two machines joined by a veth underlay; Ctrl-C removes everything")
    up.add_argument("--deb", type=Path, help="install this .deb in both machines (apt-get install)")
    up.add_argument("--tun-mode", type=lambda s: int(s, 8), default=0o666, help="mode of /dev/net/tun (octal, 666)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, systemd-nspawn)")
    if missing := missing_tools():
        parser.error(f"missing {', '.join(missing)}: apt-get install systemd-container mmdebstrap")
    if args.cmd == "build":
        print(rootfs_tarball(log=True))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with machine_pair(tun_modes=(args.tun_mode, args.tun_mode)) as pair:
            for m in pair.machines:
                if args.deb:
                    shutil.copy(args.deb, m.path("/root/l3ptp.deb"))
                    m.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/l3ptp.deb", timeout=600)
                print(f"{m.name}: nsenter -t {m.leader} -a   (netns {m.netns}, tree {m.root})")
            print("Ctrl-C stops both machines and removes everything.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped, cleaned up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
