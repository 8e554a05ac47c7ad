"""Helpers to run real workers (Tunnel) on loopback with fake TUNs.

Overlay addresses: listener 198.19.0.1 / fd00::1, connector 198.19.0.2 /
fd00::2 (per pair, the third octet / group is the pair index).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from l3ptp.ipc.control_messages import Engine, EventLoop, WorkerConfig
from l3ptp.ipc.types import PeerRole
from l3ptp.worker import keys
from l3ptp.worker.engine import EngineUnavailable, load_engine
from l3ptp.worker.tunnel import Tunnel

from .fake_tun import FakeTun

TICKET = "A" * 32
KEEPALIVE = 0.5


def engine_available(engine: Engine) -> bool:
    try:
        load_engine(engine)
    except EngineUnavailable:
        return False
    return True


def _engine_param(engine: Engine) -> Any:
    return pytest.param(engine, id=engine.value,
                        marks=pytest.mark.skipif(not engine_available(engine), reason=f"{engine.value} not installed"))


#: Parametrize a worker test over every engine (qh3 skips when not installed).
ENGINES = [_engine_param(Engine.AIOQUIC), _engine_param(Engine.QH3)]
#: Every (listener engine, connector engine) pairing, mixed ones included.
ENGINE_PAIRS = [
    pytest.param(le, ce, id=f"{le.value}-{ce.value}",
                 marks=pytest.mark.skipif(not (engine_available(le) and engine_available(ce)),
                                          reason="engine not installed"))
    for le in (Engine.AIOQUIC, Engine.QH3) for ce in (Engine.AIOQUIC, Engine.QH3)
]


@dataclasses.dataclass
class NodeKeys:
    raw: bytes
    fingerprint: str


def new_keys() -> NodeKeys:
    k = keys.generate_private_key()
    return NodeKeys(keys.private_key_raw(k), keys.fingerprint(k))


def addresses(role: PeerRole, index: int = 0) -> tuple[str, str]:
    host = 1 if role is PeerRole.LISTEN else 2
    return f"198.19.{index}.{host}", str(ipaddress.ip_address(f"fd00::{index:x}:{host}"))


def make_config(
    role: PeerRole,
    *,
    own: NodeKeys,
    peer_fp: str,
    port: int,
    index: int = 0,
    queue: int = 0,
    queues: int = 1,
    network: str = "net0",
    keepalive: float = KEEPALIVE,
    max_datagram_size: int = 1350,
    mtu: int = 1280,
    engine: Engine = Engine.AIOQUIC,
    **extra: Any,
) -> WorkerConfig:
    """`extra`: further WorkerConfig fields (e.g. the REALITY ones)."""
    peer_role = PeerRole.CONNECT if role is PeerRole.LISTEN else PeerRole.LISTEN
    v4, v6 = addresses(role, index)
    pv4, pv6 = addresses(peer_role, index)
    return WorkerConfig(
        network=network,
        queue=queue,
        queues=queues,
        ticket=TICKET,
        helper_socket="/nonexistent/helper.sock",
        bus_endpoint="ipc:///nonexistent/bus.sock",
        role=role,
        node_id=f"node-{role.value}",
        local_address="127.0.0.1" if role is PeerRole.LISTEN else None,
        peer_address="127.0.0.1" if role is PeerRole.CONNECT else None,
        port=port,
        mtu=mtu,
        max_datagram_size=max_datagram_size,
        keepalive_interval=keepalive,
        status_interval=0.2,
        private_key=own.raw,
        peer_key=peer_fp,
        tunnel_addresses=(f"{v4}/24", f"{v6}/64"),
        advertised_routes=(),
        local_sources=(f"{v4}/32", f"{v6}/128"),
        peer_sources=(f"{pv4}/32", f"{pv6}/128"),
        engine=engine,
        event_loop=EventLoop.AUTO,
        cpu=-1,
        user="",
        log_level="info",
        **extra,
    )


def udp_socket(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def pair_configs(engine: Engine = Engine.AIOQUIC) -> tuple[WorkerConfig, WorkerConfig, socket.socket]:
    """A listener's and a connector's config, pinning each other's new keys, and the listener's
    bound UDP socket (the port of both)."""
    lkeys, ckeys = new_keys(), new_keys()
    lsock = udp_socket()
    port = lsock.getsockname()[1]
    lcfg = make_config(PeerRole.LISTEN, own=lkeys, peer_fp=ckeys.fingerprint, port=port, engine=engine)
    ccfg = make_config(PeerRole.CONNECT, own=ckeys, peer_fp=lkeys.fingerprint, port=port, engine=engine)
    return lcfg, ccfg, lsock


@dataclasses.dataclass
class Node:
    config: WorkerConfig
    tun: FakeTun
    sock: socket.socket
    tunnel: Tunnel
    task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.tunnel.run())

    async def stop(self) -> None:
        self.tunnel.stop()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, 5)
        self.sock.close()
        self.tun.close()


def make_node(config: WorkerConfig, sock: socket.socket, **kw: Any) -> Node:
    tun = FakeTun()
    return Node(config, tun, sock, Tunnel(config, tun.worker_fd, sock, **kw))


@dataclasses.dataclass
class Pair:
    listener: Node
    connector: Node
    lkeys: NodeKeys
    ckeys: NodeKeys

    async def wait_established(self, timeout: float = 10.0) -> bool:
        return await wait_for(lambda: self.listener.tunnel.established and self.connector.tunnel.established, timeout)


async def wait_for(predicate: Any, timeout: float, poll: float = 0.01) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(poll)
    return bool(predicate())


@contextlib.asynccontextmanager
async def worker_pair(
    *,
    index: int = 0,
    queue: int = 0,
    lkeys: NodeKeys | None = None,
    ckeys: NodeKeys | None = None,
    listener_pin: str | None = None,
    connector_pin: str | None = None,
    listener_kw: dict[str, Any] | None = None,
    connector_kw: dict[str, Any] | None = None,
    engine: Engine = Engine.AIOQUIC,
    tunnel_kw: dict[str, Any] | None = None,
    listener_tunnel_kw: dict[str, Any] | None = None,
    connector_tunnel_kw: dict[str, Any] | None = None,
) -> AsyncIterator[Pair]:
    """A started listener + connector over loopback; stopped on exit.

    `engine` is the default of both sides; ``listener_kw``/``connector_kw``
    (make_config arguments) may override it per side. `tunnel_kw` goes to
    both `Tunnel`s (e.g. ``gso=False``), ``listener_tunnel_kw``/``connector_tunnel_kw`` to one
    (e.g. its ``tun_mode``). A node the test puts into the
    `Pair` in place of another (a restart) is the one stopped on exit.
    """
    listener_kw = {"engine": engine, **(listener_kw or {})}
    connector_kw = {"engine": engine, **(connector_kw or {})}
    lkeys = lkeys or new_keys()
    ckeys = ckeys or new_keys()
    lsock = udp_socket()
    port = lsock.getsockname()[1]
    lcfg = make_config(PeerRole.LISTEN, own=lkeys, peer_fp=listener_pin or ckeys.fingerprint, port=port,
                       index=index, queue=queue, **(listener_kw or {}))
    ccfg = make_config(PeerRole.CONNECT, own=ckeys, peer_fp=connector_pin or lkeys.fingerprint, port=port,
                       index=index, queue=queue, **(connector_kw or {}))
    listener = make_node(lcfg, lsock, **(tunnel_kw or {}), **(listener_tunnel_kw or {}))
    connector = make_node(ccfg, udp_socket(), **(tunnel_kw or {}), **(connector_tunnel_kw or {}))
    listener.start()
    connector.start()
    pair = Pair(listener, connector, lkeys, ckeys)
    try:
        yield pair
    finally:
        await pair.connector.stop()
        await pair.listener.stop()
