"""Building the `WorkerConfig` a worker gets on its stdin.

Pure apart from reading the node's private key (through the injected
`KeyLoader`) and the worker user's uid. Everything a worker knows of its
network comes from here: the configuration of its network and node, its
queue and single-use ticket, the bus endpoint, and (listen side) the peer
its predecessor last reported, for the RESTART_HINT.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
from collections.abc import Callable

from l3ptp.controller.config import Config, NetworkConfig
from l3ptp.ipc.control_messages import Engine, EventLoop, UnderlayPorts, WorkerConfig
from l3ptp.ipc.types import PeerRole

__all__ = ["KeyLoader", "build_worker_config", "load_key_raw", "load_reality_key_raw", "worker_uid"]

KeyLoader = Callable[[str], bytes]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def load_key_raw(path: str) -> bytes:
    """Raw 32-byte private key from `path` (worker key format)."""
    from l3ptp.worker.keys import load_private_key, private_key_raw

    return private_key_raw(load_private_key(path))


def load_reality_key_raw(path: str) -> bytes:
    """Raw 32-byte X25519 private key of a REALITY key file."""
    from l3ptp.worker.keys import load_reality_key_raw as load

    return load(path)


def worker_uid(config: Config) -> int:
    """The uid the workers run as: ``worker_user``, else the controller's own."""
    user = config.controller.worker_user
    return pwd.getpwnam(user).pw_uid if user else os.getuid()


def build_worker_config(
    cfg: Config,
    net: NetworkConfig,
    queue: int,
    ticket: str,
    *,
    bus_path: str,
    key_loader: KeyLoader,
    last_peer: str = "",
    reality_key_loader: KeyLoader = load_reality_key_raw,
) -> WorkerConfig:
    """The configuration of `net`'s worker for `queue`; `last_peer` is its predecessor's peer ("host:port")."""
    host, _, port = last_peer.rpartition(":")
    peer_ok = PeerRole(net.role) is PeerRole.LISTEN and _is_address(host) and port.isdigit() and 0 < int(port) < 65536
    r = net.reality
    reality_key = b"" if r is None else r.public_key or reality_key_loader(r.private_key_file)
    return WorkerConfig(
        network=net.name,
        queue=queue,
        queues=net.queues,
        ticket=ticket,
        helper_socket=cfg.controller.helper_socket,
        bus_endpoint=f"ipc://{bus_path}",
        role=PeerRole(net.role),
        node_id=cfg.node.id,
        local_address=str(net.underlay.local) if net.underlay.local is not None else None,
        peer_address=str(net.underlay.peer) if net.underlay.peer is not None else None,
        port=net.queue_port(queue),
        ports=UnderlayPorts(net.underlay.ports),
        tso=net.offload != "gro",
        mtu=net.mtu,
        max_datagram_size=net.max_datagram_size,
        keepalive_interval=net.keepalive_interval,
        status_interval=cfg.controller.status_interval,
        private_key=key_loader(net.key_path(cfg.node)),
        peer_key=net.peer_key,
        peer_keys=tuple(k for k, _ in net.peer_keys),
        peer_keys_not_after=tuple(t for _, t in net.peer_keys),
        tunnel_addresses=tuple(str(a) for a in net.addresses()),
        advertised_routes=tuple(str(r) for r in net.advertised_routes),
        local_sources=tuple(str(r) for r in net.local_sources()),
        peer_sources=tuple(str(r) for r in net.peer_sources()),
        engine=Engine(net.engine),
        event_loop=EventLoop(net.event_loop),
        cpu=net.cpus[queue % len(net.cpus)] if net.cpus else -1,
        user=cfg.controller.worker_user,
        log_level="info",
        last_peer=host if peer_ok else None,
        last_peer_port=int(port) if peer_ok else 0,
        reality_key=reality_key,
        reality_short_ids=r.short_ids if r is not None else (),
        camouflage_host=r.camouflage_host if r is not None else "",
        camouflage_port=r.camouflage_port if r is not None else 0,
        server_name=r.server_name if r is not None else "",
    )
