"""A hostile peer: a real `Tunnel` (connector) that closes with words meant
for the operator's terminal.

* `closing_engine(engine, how)`: an engine whose connection, before any AUTH,
  sends CLOSE(hostile reason) on stream 0 (``how="close"``, as soon as TLS
  completes) or a QUIC CONNECTION_CLOSE with a hostile reason phrase
  (``how="connection_close"``, once the listener's HELLO is in: 1-RTT
  packets carry the phrase, RFC 9000, 10.2.3).
* `main(argv)`: run one such peer against a listener for a bounded time, for
  the privileged end-to-end test (run inside the peer's network namespace):
  ``stranger`` (a fresh key, both ways of closing in turn), ``authenticated``
  (the pinned key: establish, then CLOSE with the hostile reason) or
  ``routes`` (the pinned key, ``--rounds`` times: establish, then two legal
  ROUTE_UPDATEs of 200 prefixes each, 400 routes in all; wait for the close).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
from typing import Any

from l3ptp.ipc.codec import frame
from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.peer_messages import PEER_CONTROL, Close, RouteUpdate
from l3ptp.ipc.types import PeerRole
from l3ptp.worker import keys
from l3ptp.worker.engine import load_engine

#: ESC ] 0 ; title BEL (set the window title), ESC [2J (clear), CR, a bidi override.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\rroot# \u202e"
#: The same, as `ipc.text.printable` shows it.
HOSTILE_SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\x0droot# \\u202e"


def closing_engine(engine: Engine, how: str) -> Any:
    base = load_engine(engine)

    class ClosingConnection(base.QuicConnection):  # type: ignore[name-defined,misc]
        def next_event(self):  # type: ignore[no-untyped-def]
            event = super().next_event()
            if how == "close" and isinstance(event, base.events.HandshakeCompleted):
                sid = self.get_next_available_stream_id()
                self.send_stream_data(sid, frame(PEER_CONTROL, Close(code=int(ErrorCode.SHUTDOWN), reason=HOSTILE)))
            elif how == "connection_close" and isinstance(event, base.events.StreamDataReceived):
                self.close(error_code=int(ErrorCode.SHUTDOWN), reason_phrase=HOSTILE)
                return None
            return event

    return dataclasses.replace(base, QuicConnection=ClosingConnection)


def send_close(tunnel: Any, reason: str = HOSTILE) -> None:
    """CLOSE(SHUTDOWN, reason) on the active session's stream, unescaped (as a
    hostile implementation would send it; our own `Session` escapes)."""
    peer = tunnel.active
    peer.conn.send_stream_data(peer.stream_id, frame(PEER_CONTROL, Close(code=int(ErrorCode.SHUTDOWN),
                                                                           reason=reason)))
    tunnel._transmit(peer)
    tunnel._schedule()  # whatever pacing held back goes at the next timer


def send_route_updates(tunnel: Any) -> None:
    """Two ROUTE_UPDATEs, legal one by one (200 prefixes each), 400 routes together: /28s in
    198.19.128.0/17, inside the lab's overlay range (never another private or public address)."""
    peer = tunnel.active
    epoch = peer.session.params.route_epoch
    for i in range(2):
        routes = tuple(f"198.19.{128 + (i * 200 + j) // 16}.{(i * 200 + j) % 16 * 16}/28" for j in range(200))
        peer.conn.send_stream_data(peer.stream_id, frame(PEER_CONTROL, RouteUpdate(
            add_routes=routes, remove_routes=(), route_epoch=epoch + 1 + i)))
    tunnel._transmit(peer)
    tunnel._schedule()


async def _run(args: argparse.Namespace) -> int:
    from l3ptp.worker.tunnel import Tunnel
    from tests.support.fake_tun import FakeTun
    from tests.support.worker_fixtures import NodeKeys, make_config, new_keys

    engine = Engine(args.engine)
    if args.mode in ("authenticated", "routes"):
        key = keys.load_private_key(args.key)
        own = NodeKeys(keys.private_key_raw(key), keys.fingerprint(key))
        runs: list[str | None] = [None] * (args.rounds if args.mode == "routes" else 1)
    else:
        own = new_keys()
        runs = ["close", "connection_close"]
    base = make_config(PeerRole.CONNECT, own=own, peer_fp=args.pin, port=args.port, network=args.network,
                       engine=engine, keepalive=1.0)
    config = dataclasses.replace(base, peer_address=args.peer,
                                 tunnel_addresses=tuple(args.address), local_sources=(), peer_sources=())
    for how in runs:
        tun = FakeTun()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        tunnel = Tunnel(config, tun.worker_fd, sock, engine=closing_engine(engine, how) if how else None)
        task = asyncio.create_task(tunnel.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.seconds
        try:
            if how is None:
                while not tunnel.established and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                if not tunnel.established:
                    print(f"not established: {tunnel.last_error}")
                    return 1
                # Then wait for the listener to end the session, and stop before
                # the reconnect (>= 0.25 s later) could start another one.
                if args.mode == "routes":
                    send_route_updates(tunnel)
                else:
                    send_close(tunnel)
                while tunnel.established and loop.time() < deadline:
                    await asyncio.sleep(0.02)
            else:  # long enough for a handshake and the close
                while tunnel.sessions == 0 and not tunnel.last_error and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
            print(f"{how or args.mode}: {tunnel.last_error!r}")
        finally:
            tunnel.stop()
            await asyncio.wait_for(task, 5)
            sock.close()
            tun.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hostile_peer")
    parser.add_argument("mode", choices=["stranger", "authenticated", "routes"])
    parser.add_argument("--peer", required=True, help="listener's underlay address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pin", required=True, help="listener's key fingerprint")
    parser.add_argument("--network", required=True)
    parser.add_argument("--key", help="authenticated: the pinned connector key file")
    parser.add_argument("--address", action="append", default=[], help="our tunnel address (repeat)")
    parser.add_argument("--engine", default="aioquic")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    return asyncio.run(asyncio.wait_for(_run(args), args.seconds * (2 + args.rounds) + 10))
