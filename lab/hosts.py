"""The two-host lab shared by `make demo`, `make bench` and the end-to-end tests.

Root only. Host A and host B are network namespaces joined by a veth pair
(the underlay, 198.18.0.0/16). Each runs the whole stack the way a
production host does:

* ``l3ptp-helper`` as its own unprivileged uid holding only CAP_NET_ADMIN
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
import ctypes
import dataclasses
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from l3ptp.ipc.hardening import PR_CAP_AMBIENT, PR_CAPBSET_DROP, capset, libc, prctl

__all__ = ["Host", "Interrupts", "Lab", "LabError", "free_ids"]

CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT_RAISE = 2
#: systemd's range for dynamic users: never in /etc/passwd.
DYNAMIC_ID_RANGE = range(61184, 65520)
NETLINK_CHILD_TIMEOUT = 15  # seconds; see netlink()

UNDERLAY = ("198.18.0.1", "198.18.0.2")
UNDERLAY_PREFIXLEN = 24
OVERLAY4 = ("198.19.0.1", "198.19.0.2")
OVERLAY6 = ("fd00:19::1", "fd00:19::2")
#: Addresses behind each host (on its loopback), advertised by it and
#: accepted by the other, so each side installs a route for the other's.
BEHIND = {"a": ("198.19.10.1", "fd00:19:10::1"), "b": ("198.19.20.1", "fd00:19:20::1")}
REMOTE4, REMOTE6 = BEHIND["b"]


def behind_prefixes(name: str) -> list[str]:
    v4, v6 = BEHIND[name]
    return [v4.rsplit(".", 1)[0] + ".0/24", v6.rsplit("::", 1)[0] + "::/64"]
BASE_PORT = 4433
NETWORK = "demo"


class LabError(RuntimeError):
    """A lab step failed; the message says which and why."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(netns: str) -> None:
    """Move the calling (single-threaded) process into network namespace `netns`."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc().setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)


def netlink(netns: str) -> Any:
    """A pyroute2 `NetNS` (netlink inside `netns`), patient with a loaded machine.

    pyroute2 opens the socket in a forked child and waits 2 s for it by default;
    with both tunnel ends, iperf3 and the kernel sharing two cores that is too short.
    """
    from pyroute2 import NetNS, config

    config.default_communicate_timeout = max(config.default_communicate_timeout, NETLINK_CHILD_TIMEOUT)
    return NetNS(netns)


def _enter(netns: str, uid: int | None = None, gid: int | None = None, net_admin_only: bool = False) -> Callable[[], None]:
    """A preexec_fn: enter `netns`, then become uid/gid.

    With `net_admin_only`, every capability but CAP_NET_ADMIN leaves the
    bounding set first; a non-root `uid` then keeps CAP_NET_ADMIN as an
    ambient capability (systemd's AmbientCapabilities=), while uid 0 ends up
    with exactly the bounding set after exec.
    """

    def run() -> None:
        setns(netns)
        if uid is None:
            return
        if net_admin_only:
            last = int(open("/proc/sys/kernel/cap_last_cap").read())
            for cap in range(last + 1):
                if cap != CAP_NET_ADMIN:
                    prctl(PR_CAPBSET_DROP, cap)
            prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setgid(gid if gid is not None else uid)
        os.setuid(uid)
        if net_admin_only:
            capset(1 << CAP_NET_ADMIN)
            if uid != 0:
                prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN)

    return run


def tun_open_to_all() -> bool:
    """True if /dev/net/tun is read-write for everyone (Debian's udev default)."""
    try:
        return os.stat("/dev/net/tun").st_mode & 0o006 == 0o006
    except OSError:
        return False


def _running_uids() -> set[int]:
    uids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                uids.add(os.stat(f"/proc/{pid}").st_uid)
    return uids


def free_ids(count: int) -> list[int]:
    """`count` ids from the dynamic-user range with no passwd/group entry and no process."""
    import grp

    busy = _running_uids()
    out = []
    start = DYNAMIC_ID_RANGE.start + secrets.randbelow(len(DYNAMIC_ID_RANGE) - 1000)
    for n in range(start, DYNAMIC_ID_RANGE.stop):
        if n in busy:
            continue
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            pass
        out.append(n)
        if len(out) == count:
            return out
    raise LabError("no free ids in the dynamic-user range")


@dataclasses.dataclass
class Host:
    """One side of the lab."""

    name: str  # "a" or "b"
    netns: str
    dir: str
    underlay: str
    overlay4: str
    overlay6: str
    config_path: str = ""
    policy_path: str = ""
    runtime_dir: str = ""
    helper_socket: str = ""
    fingerprint: str = ""
    config_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The `demo` network's table and its underlay table, as last written.
    network: dict[str, Any] = dataclasses.field(default_factory=dict)
    underlay_table: dict[str, Any] = dataclasses.field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)
    logs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.runtime_dir, "control.sock")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for table, values in tables.items():
        out.append(f"[{table}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


class Lab:
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
        config_a: dict[str, Any] | None = None,
        config_b: dict[str, Any] | None = None,
        policy_extra: dict[str, Any] | None = None,
    ) -> None:
        self.queues = queues
        self.engine = engine
        self.say = say or (lambda line: None)
        self.python = python or sys.executable
        self.underlay_via_default_route = underlay_via_default_route
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
                underlay=UNDERLAY[i],
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

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

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
                f.write(_toml({"": policy}).removeprefix("[]\n"))
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
            net.update({k: v for k, v in host.config_extra.items() if not isinstance(v, dict)})
            underlay.update(host.config_extra.get("underlay", {}))
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
            f.write(_toml(tables))
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
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=preexec or _enter(host.netns), env=env, cwd="/",
                                    start_new_session=True)
        finally:
            log.close()
        host.procs[what] = proc
        host.logs[what] = log_path
        self._started.append(proc.pid)
        return proc

    def start_helper(self, host: Host, *, wait: float = 20.0) -> subprocess.Popen[bytes]:
        """l3ptp-helper with CAP_NET_ADMIN only (its own uid, or uid 0 if /dev/net/tun is root-only)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.helper_socket)
        proc = self.spawn(host, "helper", [self.python, "-m", "l3ptp.helper", "--policy", host.policy_path],
                          preexec=_enter(host.netns, self.helper_uid, self.gid, net_admin_only=True))
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
                          preexec=_enter(host.netns, self.helper_uid, self.gid, net_admin_only=True))
        return proc.wait(timeout)

    def start_controller(self, host: Host, *, wait: float = 20.0) -> subprocess.Popen[bytes]:
        """l3ptp-controller (and so its workers) as an unprivileged uid with no capability."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host.control_socket)
        proc = self.spawn(host, "controller",
                          [self.python, "-m", "l3ptp.controller", "--config", host.config_path],
                          preexec=_enter(host.netns, self.controller_uid, self.gid))
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
            self.say(f"host {host.name}: helper up (pid {host.procs['helper'].pid}, CAP_NET_ADMIN only)")
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

    def stop(self) -> dict[str, int | None]:
        """Orderly stop: controllers first (CLOSE, workers, networks destroyed), then helpers."""
        codes = {}
        for what in ("controller", "helper"):
            for host in self.hosts.values():
                codes[f"{host.name}.{what}"] = self.stop_process(host, what)
        return codes

    # ---- observing ----------------------------------------------------------------

    def status(self, host: Host, *, verbose: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        """`l3ptp status --json` of `host`, as a dict."""
        from l3ptp.controller.cli import ControllerUnreachable, request, status_json
        from l3ptp.ipc.control_messages import StatusReply, StatusRequest

        try:
            reply = request(host.control_socket, StatusRequest(verbose=verbose), timeout=timeout)
        except ControllerUnreachable as exc:
            raise LabError(f"host {host.name}: {exc}") from None
        if not isinstance(reply, StatusReply):
            raise LabError(f"host {host.name}: unexpected status reply {reply!r}")
        return json.loads(status_json(reply))

    def status_text(self, host: Host, *, verbose: bool = False) -> str:
        from l3ptp.controller.cli import format_status, request
        from l3ptp.ipc.control_messages import StatusRequest

        return format_status(request(host.control_socket, StatusRequest(verbose=verbose)), verbose=verbose)

    def network(self, host: Host, name: str = NETWORK) -> dict[str, Any]:
        for net in self.status(host)["networks"]:
            if net["name"] == name:
                return net
        raise LabError(f"host {host.name}: no network {name!r} in status")

    def wait_established(self, timeout: float = 30.0, name: str = NETWORK) -> None:
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = []
            for host in self.hosts.values():
                for what in ("helper", "controller"):
                    proc = host.procs.get(what)
                    if proc is not None and proc.poll() is not None:
                        raise LabError(f"{what} on host {host.name} exited with {proc.returncode}:\n"
                                       f"{self.tail(host, what)}")
                with contextlib.suppress(LabError):
                    net = self.network(host, name)
                    states += [q["state"] for q in net["queues"]]
            if len(states) == 2 * self.queues and all(s == "established" for s in states):
                return
            time.sleep(0.2)
        raise LabError(f"tunnel not established within {timeout:g}s (queue states {states}):\n"
                       f"{self.tail(self.a, 'controller')}\n{self.tail(self.b, 'controller')}")

    def tail(self, host: Host, what: str, lines: int = 25) -> str:
        path = host.logs.get(what) or os.path.join(host.dir, f"{what}.log")
        try:
            with open(path, "rb") as f:
                text = f.read()[-20000:].decode(errors="replace")
        except OSError:
            return f"(no {what} log on host {host.name})"
        return "\n".join(f"  {host.name}/{what}| {line}" for line in text.splitlines()[-lines:])

    def pids(self, host: Host) -> dict[str, Any]:
        """PIDs of the helper, the controller and the workers in `host` (children of this controller or
        adopted from an earlier one)."""
        ctl = host.procs.get("controller")
        return {"helper": host.procs["helper"].pid if "helper" in host.procs else None,
                "controller": ctl.pid if ctl else None, "workers": workers_in(host.netns)}

    def cli(self, host: Host, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run the real `l3ptp` CLI against `host`'s controller: (exit status, stdout, stderr)."""
        import io

        from l3ptp.controller.cli import main as cli_main

        out, err = io.StringIO(), io.StringIO()
        code = cli_main(["--runtime-dir", host.runtime_dir, "--timeout", str(timeout), *args], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def links(self, host: Host) -> dict[str, dict[str, Any]]:
        """Links inside `host`: name -> {index, mtu, up, rx_packets, tx_packets}."""
        out = {}
        with netlink(host.netns) as ipr:
            for link in ipr.get_links():
                stats = link.get_attr("IFLA_STATS64") or {}
                out[link.get_attr("IFLA_IFNAME")] = {
                    "index": link["index"], "mtu": link.get_attr("IFLA_MTU"), "up": bool(link["flags"] & 1),
                    "rx_packets": stats.get("rx_packets", 0), "tx_packets": stats.get("tx_packets", 0),
                }
        return out

    def routes(self, host: Host, *, proto: int | None = None) -> list[dict[str, Any]]:
        """IPv4 and IPv6 unicast routes inside `host` (all tables), optionally only those of `proto`."""
        out = []
        with netlink(host.netns) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for family in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=family):  # every table
                    if r["type"] != 1 or (proto is not None and r["proto"] != proto):
                        continue
                    dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                    out.append({"dst": f"{dst}/{r['dst_len']}", "proto": r["proto"], "table": r.get_attr("RTA_TABLE"),
                                "dev": names.get(r.get_attr("RTA_OIF"), "")})
        return out

    def add_address(self, host: Host, address: str) -> None:
        """Put `address` (a host address) on `host`'s loopback."""
        import ipaddress

        ip = ipaddress.ip_address(address)
        with netlink(host.netns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=ip.max_prefixlen)

    # ---- running tools inside the hosts ---------------------------------------------

    def run(self, host: Host, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a tool (ping, iperf3) as root inside `host`; bounded by `timeout`."""
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             preexec_fn=_enter(host.netns), cwd="/")
        if check and res.returncode != 0:
            raise LabError(f"host {host.name}: {' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def popen(self, host: Host, argv: Sequence[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_enter(host.netns), cwd="/", start_new_session=True)
        host.procs[f"tool-{proc.pid}"] = proc  # type: ignore[assignment]
        self._started.append(proc.pid)
        return proc

    def ping(self, src: Host, dst: str, *, count: int = 3, size: int | None = None, df: bool = False,
             check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2"]
        if size is not None:
            argv += ["-s", str(size)]
        if df:
            argv += ["-M", "do"]
        return self.run(src, [*argv, dst], timeout=timeout, check=check)

    @contextlib.contextmanager
    def iperf3_server(self, host: Host, *, port: int = 5201) -> Iterator[subprocess.Popen[str]]:
        proc = self.popen(host, ["iperf3", "-s", "-1", "-p", str(port)])
        try:
            deadline = time.monotonic() + 10
            while not self._listening(host, port) and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise LabError(f"iperf3 server on host {host.name} exited: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.05)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.communicate(timeout=5)  # also closes the pipes
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=5)
            host.procs.pop(f"tool-{proc.pid}", None)

    def _listening(self, host: Host, port: int) -> bool:
        """Is a TCP socket listening on `port` inside `host`? (Reads /proc/self/net in a child; never connects.)"""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                setns(host.netns)
                for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
                    with open(table) as f:
                        for line in f.readlines()[1:]:
                            fields = line.split()
                            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                                code = 0
            except BaseException:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def iperf3(self, client: Host, server: Host, *, seconds: float = 2.0, udp_rate: str | None = None,
               streams: int = 1, reverse: bool = False, port: int = 5201, dst: str | None = None) -> dict[str, Any]:
        """One bounded iperf3 run from `client` to `server` across the tunnel; iperf3's JSON result."""
        with self.iperf3_server(server, port=port):
            argv = ["iperf3", "-c", dst or server.overlay4, "-p", str(port), "-t", str(seconds), "-J",
                    "-P", str(streams), "--connect-timeout", "3000"]
            if udp_rate:
                argv += ["-u", "-b", udp_rate, "-l", "1200"]
            if reverse:
                argv.append("-R")
            res = self.run(client, argv, timeout=seconds + 30, check=False)
        try:
            result = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise LabError(f"iperf3 gave no JSON ({res.returncode}): {res.stderr.strip()[-500:]}") from None
        if "error" in result:
            raise LabError(f"iperf3: {result['error']}")
        return result

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
        left += [f"process {pid}" for pid in sorted({*self._started, *pids}) if _alive(pid)]
        own = [self.workdir] if self._own_workdir else []
        left += [f"path {p}" for p in (*own, *extra_paths) if os.path.exists(p)]
        return left


class Interrupts:
    """Ctrl-C and SIGTERM for the lab commands (demo, bench): a flag plus KeyboardInterrupt.

    The exception alone can be lost: raised while the interpreter runs a fork
    hook (logging's ``_releaseLock`` around a subprocess fork) it is printed
    and ignored, and the command would carry on. So commands also call
    `check()` between steps. Children forked by libraries (pyroute2's netns
    helpers) inherit the handler and simply exit.
    """

    def __init__(self) -> None:
        self.hit = False
        self._pid = os.getpid()

    def install(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:
            os._exit(128 + signum)
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came, even if its first exception was swallowed."""
        if self.hit:
            raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _holds_tun(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun" for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


def workers_in(netns: str, *, spares: bool = False) -> list[int]:
    """Live l3ptp worker processes inside the network namespace `netns`, from /proc; with `spares`,
    also the controller's spare while it waits for a config (``--queue -1``, holding no TUN queue yet)."""
    try:
        ns = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino == ns and _alive(int(entry)):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if b"l3ptp.worker" in cmdline and (spares or b"\0--queue\0-1\0" not in cmdline
                                                   or _holds_tun(int(entry))):
                    out.append(int(entry))
    return sorted(out)
