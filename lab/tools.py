"""What the lab's users look at and run inside its hosts: status, links, routes, ping, iperf3.

`LabTools` is the half of `lab.hosts.Lab` that only observes the running
hosts or runs a bounded tool inside one; building, starting and stopping
are in `lab.hosts`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from lab.netns import enter, netlink, setns
from lab.procs import workers_in
from lab.topology import NETWORK, Host, LabError

__all__ = ["LabTools"]


class LabTools:
    """Observing and tools; mixed into `Lab`, whose attributes these are."""

    hosts: dict[str, Host]
    queues: int
    _started: list[int]

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

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
                             preexec_fn=enter(host.netns), cwd="/")
        if check and res.returncode != 0:
            raise LabError(f"host {host.name}: {' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def popen(self, host: Host, argv: Sequence[str], *, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """Start a tool inside `host`; `stdout` may be a file for a long run (a pipe nobody reads fills up
        after 64 KiB and then blocks the tool)."""
        proc = subprocess.Popen(list(argv), stdout=stdout, stderr=subprocess.PIPE, text=True,
                                preexec_fn=enter(host.netns), cwd="/", start_new_session=True)
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
    def iperf3_server(self, host: Host, *, port: int = 5201, bind: str | None = None) -> Iterator[subprocess.Popen[str]]:
        proc = self.popen(host, ["iperf3", "-s", "-1", "-p", str(port), *(["-B", bind] if bind else [])])
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
        """One bounded iperf3 run from `client` to `server` across the tunnel; iperf3's JSON result. With `dst`
        the server is bound to it: a UDP test to an address the reply would not come from by itself (one
        behind the tunnel, on B's loopback) would otherwise see replies from the TUN's address and stall."""
        with self.iperf3_server(server, port=port, bind=dst):
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
