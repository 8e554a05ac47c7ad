"""`l3ptp-worker`: one queue of one network.

Order (docs/worker.md): warm the QUIC engines up -> read `WorkerConfig` from stdin -> drop privileges
(switch user if root and configured; clear ambient caps, no_new_privs,
capset to zero, verify) -> claim the queue fd from the helper -> create and
bind the UDP socket -> ask the helper to protect it -> run the tunnel and the
controller bus until Shutdown, controller silence or SIGTERM. It survives
its controller's death (the next controller adopts it). A failure
before the tunnel runs is reported as `WorkerExiting(fatal=True)` when the
bus is reachable, and exits with status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable

from l3ptp.ipc.control_messages import WORKER_CONFIG, EventLoop, WorkerConfig, WorkerExiting
from l3ptp.ipc.constants import UDP_SOCKET_BUFFER, WORKER_CONFIG_MAX
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.logsetup import configure
from l3ptp.ipc.types import PeerRole

from . import engine, warmup
from .app import ZmqBus, run_worker
from .helper_client import HelperError, WorkerHelperClient
from .policy import normalize_ip
from .privileges import PrivilegeError, drop_privileges
from .steering import shares_port

EXIT_FATAL = 2


def read_config(stream) -> WorkerConfig:  # type: ignore[no-untyped-def]
    data = stream.read(WORKER_CONFIG_MAX + 1)
    msg = WORKER_CONFIG.decode_untrusted(data)
    assert isinstance(msg, WorkerConfig)
    return msg


def make_udp_socket(config: WorkerConfig) -> socket.socket:
    """Listener: bind (local_address or any, port), with SO_REUSEPORT on a shared port (its network's other
    queues bind it too; the kernel admits only sockets of the same effective uid to the group). Connector:
    bind any port of the peer's family."""
    if config.role is PeerRole.LISTEN:
        host = config.local_address or "::"
        port = config.port
    else:
        # A peer given by name may resolve to either family: a dual-stack socket, IPv4 only without IPv6.
        peer = config.peer_address or ""
        named = bool(peer) and normalize_ip(peer) is None
        host = config.local_address or ("::" if ":" in peer or (named and socket.has_ipv6) else "0.0.0.0")
        port = 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        if not (family == socket.AF_INET6 and host == "::" and config.role is PeerRole.CONNECT):
            raise
        host, family = "0.0.0.0", socket.AF_INET  # IPv6 switched off on this host
        sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Bursts at hundreds of Mbit/s overflow the default ~208 KiB buffers
    # (counted as seq_lost on the peer). The kernel caps this at
    # net.core.rmem_max / wmem_max without an error; operations.md says how
    # to raise those.
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
    if shares_port(config):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _fatal(config: WorkerConfig, reason: str, log) -> int:  # type: ignore[no-untyped-def]
    log.error("worker_fatal", reason=reason)
    with contextlib.suppress(Exception):
        bus = ZmqBus(config.bus_endpoint)
        bus.send(WorkerExiting(network=config.network, queue=config.queue, reason=reason[:512], fatal=True,
                               remote=False))
        bus.close()
    return EXIT_FATAL


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for `uvloop`, None (plain asyncio) for `asyncio` and `auto`.

    `auto` is asyncio because uvloop did not measure faster here: with qh3
    TCP x1 0.94x and CPU per GB 1.06x, with aioquic (and its BurstPacer)
    TCP x1 1.04x, pings 1.1x (docs/performance.md, "uvloop"). Raises
    ImportError for `uvloop` when it is missing.
    """
    if choice is not EventLoop.UVLOOP:
        return None
    import uvloop

    return uvloop.new_event_loop


def pin_cpu(cpu: int) -> None:
    """Pin this worker to `cpu` (-1: leave the scheduler alone). OSError if impossible."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})


async def _serve(config: WorkerConfig, tun_fd: int, sock: socket.socket) -> str:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    bus = ZmqBus(config.bus_endpoint)
    try:
        return await run_worker(config, tun_fd, sock, bus, stop_event=stop)
    finally:
        bus.close()


def warm_up() -> None:
    """Pay the QUIC engines' one-time costs before the config arrives (a spare waits for it here), not
    in the recovery after a kill -9 (`warmup.warm_up`: in memory, no I/O, no input from outside).
    Best effort: an engine that fails here fails the real handshake too, with a reason."""
    with contextlib.suppress(Exception):
        warmup.warm_up()


def _engine_name(config: WorkerConfig) -> str:
    """The QUIC engine this worker runs (`auto` resolved): the warm-up loads every engine, so
    which one carries the tunnel is only said here."""
    try:
        return str(engine.load_engine(config.engine).name)
    except engine.EngineUnavailable as exc:
        return f"unavailable ({exc})"


def preload() -> None:
    """What the fork server (worker/zygote.py) runs once before it forks workers: the warm-up.
    (Importing this module has already imported everything a worker runs.)"""
    warm_up()


def forked_main() -> int:
    """`main` in a child of the fork server, which has warmed up already (`preload`)."""
    return main(warm=False)


def main(*, warm: bool = True) -> int:
    if warm:
        warm_up()
    try:
        config = read_config(sys.stdin.buffer)
    except DecodeError as exc:
        print(f"l3ptp-worker: bad config on stdin: {exc}", file=sys.stderr)
        return EXIT_FATAL
    log = configure("worker", level=config.log_level, network=config.network, queue=config.queue)
    try:
        status = drop_privileges(config.user)
    except (PrivilegeError, OSError) as exc:
        return _fatal(config, f"dropping privileges failed: {exc}", log)
    log.info("privileges_dropped", cap_eff=status["CapEff"], no_new_privs=status["NoNewPrivs"])
    # No parent-death signal: a worker outlives its controller's crash and is adopted by the next
    # controller (docs/controller.md, "Restarts"); controller silence for CONTROLLER_SILENCE_TIMEOUT ends it.
    try:
        helper = WorkerHelperClient(config.helper_socket)
        grant, tun_fd = helper.claim_queue(config.ticket)
        sock = make_udp_socket(config)
        shared = shares_port(config)
        mark = helper.protect_socket(sock, config.network, config.queue, shared).mark
        helper.close()
    except (HelperError, OSError) as exc:
        return _fatal(config, f"helper: {exc}", log)
    try:
        pin_cpu(config.cpu)
        factory = loop_factory(config.event_loop)
    except OSError as exc:
        return _fatal(config, f"cannot pin to CPU {config.cpu}: {exc.strerror or exc}", log)
    except ImportError:
        return _fatal(config, "event_loop = uvloop but uvloop is not installed (pip install l3ptp[fast])", log)
    log.info("worker_starting", ifname=grant.ifname, tun_queue=grant.queue, mark=mark, port=sock.getsockname()[1],
             ports=str(config.ports) if shared else "own",
             cpu=config.cpu, event_loop="uvloop" if factory else "asyncio", engine=_engine_name(config))
    # The start-up objects (modules, engines, the warm-up's: some 43,000) leave the collector's reach: a
    # full collection, rare but at any packet, then scans what the worker made since instead of pausing
    # the datapath for about 10 ms (docs/performance.md, "Latency").
    gc.freeze()
    with asyncio.Runner(loop_factory=factory) as runner:
        reason = runner.run(_serve(config, tun_fd, sock))
    log.info("worker_exiting", reason=reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
