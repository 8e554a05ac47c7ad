"""Two real workers (Tunnel) on loopback, each with a fake TUN, for every QUIC engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest

from l3ptp.ipc.codec import StreamDecoder
from l3ptp.ipc.control_messages import Engine, SessionState
from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.peer_messages import PEER_CONTROL
from l3ptp.ipc.types import PeerRole
from l3ptp.worker.engine import load_engine
from l3ptp.worker.header import encode_datagram
from l3ptp.worker.policy import RESTART_HINT
from tests.support.hostile_peer import HOSTILE, HOSTILE_SHOWN, closing_engine, send_close
from tests.support.packets import ipv4_icmp_echo, ipv4_udp, ipv6_icmp_echo, ipv6_udp
from tests.support.worker_fixtures import (
    ENGINE_PAIRS,
    ENGINES,
    make_config,
    make_node,
    new_keys,
    udp_socket,
    wait_for,
    worker_pair,
)

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


async def _exchange(pair, index: int = 0) -> None:
    l4, l6 = f"198.19.{index}.1", ("fd00::1" if index == 0 else f"fd00::{index:x}:1")
    c4, c6 = f"198.19.{index}.2", ("fd00::2" if index == 0 else f"fd00::{index:x}:2")
    to_listener = [ipv4_udp(c4, l4, b"v4 up"), ipv6_udp(c6, l6, b"v6 up" * 50), ipv4_icmp_echo(c4, l4, payload=b"p")]
    to_connector = [ipv6_icmp_echo(l6, c6, payload=b"q" * 1000), ipv4_udp(l4, c4, b"v4 down" * 100)]
    for p in to_listener:
        pair.connector.tun.inject(p)
    for p in to_connector:
        pair.listener.tun.inject(p)
    assert await pair.listener.tun.async_wait_packets(len(to_listener), 5) == to_listener
    assert await pair.connector.tun.async_wait_packets(len(to_connector), 5) == to_connector


@pytest.mark.parametrize("engine", ENGINES)
def test_ipv4_ipv6_both_ways_byte_for_byte(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            await _exchange(pair)
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            assert lt.datapath.mtu == ct.datapath.mtu == 1280
            assert lt.counters.total_drops() == 0 and ct.counters.total_drops() == 0
            assert ct.counters.tun_rx_packets == 3 and lt.counters.tun_tx_packets == 3
            assert lt.status().state == "established" and lt.sessions == 1

    run(main())


def _assert_rejected(pair) -> None:
    for node in (pair.listener, pair.connector):
        c = node.tunnel.counters
        assert c.tun_tx_packets == 0 and c.dgram_tx_packets == 0
        assert node.tun.read_all() == []
        assert not node.tunnel.established


@pytest.mark.parametrize("engine", ENGINES)
def test_connector_with_unpinned_key_rejected(engine: Engine) -> None:
    async def main():
        stranger = new_keys()
        async with worker_pair(listener_pin=stranger.fingerprint, engine=engine) as pair:
            ok = await wait_for(lambda: "AUTH_FAILED" in pair.listener.tunnel.last_error, 10)
            assert ok, pair.listener.tunnel.last_error
            pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"x"))
            pair.listener.tun.inject(ipv4_udp("198.19.0.1", "198.19.0.2", b"x"))
            await asyncio.sleep(0.3)
            _assert_rejected(pair)
            assert "AUTH_FAILED" in pair.connector.tunnel.last_error

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_listener_with_unpinned_key_rejected(engine: Engine) -> None:
    async def main():
        stranger = new_keys()
        async with worker_pair(connector_pin=stranger.fingerprint, engine=engine) as pair:
            ok = await wait_for(lambda: "AUTH_FAILED" in pair.connector.tunnel.last_error, 10)
            assert ok, pair.connector.tunnel.last_error
            await asyncio.sleep(0.3)
            _assert_rejected(pair)

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_malformed_datagrams_counted_worker_keeps_running(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            conn = ct.active.conn
            ctx = lt.datapath.rx_context_id
            good = ipv4_udp("198.19.0.2", "198.19.0.1", b"ok")
            bad = {
                DropReason.DGRAM_BAD_HEADER: b"\x00garbage-datagram",
                DropReason.DGRAM_UNKNOWN_CONTEXT: encode_datagram(ctx ^ 1, 0, good),
                DropReason.DGRAM_SRC_NOT_ALLOWED: encode_datagram(ctx, 0, ipv4_udp("198.19.0.77", "198.19.0.1")),
                DropReason.DGRAM_BAD_IP_VERSION: encode_datagram(ctx, 0, b"\x50" + good[1:]),
                DropReason.DGRAM_BAD_IP: encode_datagram(ctx, 0, good[:-1]),
                DropReason.DGRAM_OVERSIZE: encode_datagram(ctx, 0, ipv4_udp("198.19.0.2", "198.19.0.1", b"x" * 1269)),
            }
            for payload in bad.values():
                conn.send_datagram_frame(payload)
            ct._transmit(ct.active)
            assert await wait_for(lambda: all(lt.counters.drops[r] == 1 for r in bad), 5), lt.counters.drops
            await _exchange(pair)

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_garbage_control_message_closes_session_and_recovers(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            ct = pair.connector.tunnel
            peer = ct.active
            peer.conn.send_stream_data(peer.stream_id, b"\x00\x00\x00\x03\xc1\xc1\xc1")
            ct._transmit(peer)
            assert await wait_for(lambda: "PROTOCOL_VIOLATION" in pair.listener.tunnel.last_error, 5)
            # The connector is told, backs off and reconnects; traffic resumes.
            assert await wait_for(lambda: ct.sessions >= 2 and pair.listener.tunnel.established, 10)
            assert await pair.wait_established()
            await _exchange(pair)

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_oversized_datagram_does_not_block_later_packets(engine: Engine) -> None:
    async def main():
        # A small max_datagram_size on the connector makes its live budget
        # smaller than the MTU the listener allows it to receive.
        async with worker_pair(connector_kw={"max_datagram_size": 1200}, engine=engine) as pair:
            assert await pair.wait_established()
            ct = pair.connector.tunnel
            budget = ct.engine.datagram_budget(ct.active.conn)
            assert ct.datapath.packet_limit == min(ct.datapath.mtu, budget - 16)
            big = ipv4_udp("198.19.0.2", "198.19.0.1", b"B" * (ct.datapath.packet_limit - 28 + 1), df=True)
            small = [ipv4_udp("198.19.0.2", "198.19.0.1", bytes([i]) * 10) for i in range(5)]
            pair.connector.tun.inject(big)
            for p in small:
                pair.connector.tun.inject(p)
            assert await pair.listener.tun.async_wait_packets(5, 5) == small
            assert ct.counters.drops[DropReason.TUN_OVERSIZE] == 1
            assert ct.engine.queue_depth(ct.active.conn) == 0
            fits = ipv4_udp("198.19.0.2", "198.19.0.1", b"F" * (ct.datapath.packet_limit - 28))
            pair.connector.tun.inject(fits)
            assert await pair.listener.tun.async_wait_packets(1, 5) == [fits]
            # Without DF the big one goes as two fragments that each fit.
            pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"B" * (ct.datapath.packet_limit - 28 + 1)))
            pieces = await pair.listener.tun.async_wait_packets(2, 5)
            assert len(pieces) == 2 and all(len(p) <= ct.datapath.packet_limit for p in pieces)
            assert ct.datapath.fragmented == 1 and ct.counters.drops[DropReason.TUN_OVERSIZE] == 1

    run(main())


def _recording_engine(log: list[tuple[int, int, bytes]], engine: Engine):
    base = load_engine(engine)

    class RecordingConnection(base.QuicConnection):
        def send_stream_data(self, stream_id, data, end_stream=False):
            log.append((id(self), stream_id, bytes(data)))
            return super().send_stream_data(stream_id, data, end_stream)

    import dataclasses

    return dataclasses.replace(base, QuicConnection=RecordingConnection)


@pytest.mark.parametrize("engine", ENGINES)
def test_ip_packets_never_sent_on_a_stream(engine: Engine) -> None:
    async def main():
        log: list[tuple[int, int, bytes]] = []
        recording = _recording_engine(log, engine)
        async with worker_pair(engine=engine, tunnel_kw={"engine": recording}) as pair:
            assert await pair.wait_established()
            up = [ipv4_udp("198.19.0.2", "198.19.0.1", b"SECRET-PAYLOAD-%d" % i) for i in range(20)]
            down = [ipv6_udp("fd00::1", "fd00::2", b"SECRET-PAYLOAD-%d" % i) for i in range(20)]
            for p in up:
                pair.connector.tun.inject(p)
            for p in down:
                pair.listener.tun.inject(p)
            assert await pair.listener.tun.async_wait_packets(20, 5) == up
            assert await pair.connector.tun.async_wait_packets(20, 5) == down
            await asyncio.sleep(KEEPALIVE_WAIT)  # let keepalives flow too
        assert log, "control messages must have been sent"
        assert {sid for _, sid, _ in log} == {0}
        by_conn: dict[int, bytes] = {}
        for conn_id, _, data in log:
            assert b"SECRET-PAYLOAD" not in data
            by_conn[conn_id] = by_conn.get(conn_id, b"") + data
        for data in by_conn.values():
            # Everything on the stream decodes as control messages, nothing else.
            assert StreamDecoder(PEER_CONTROL).feed(data)

    run(main())


KEEPALIVE_WAIT = 0.5


@pytest.mark.parametrize("engine", ENGINES)
def test_restart_listener_connector_reconnects_and_traffic_resumes(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            connector = pair.connector
            assert await pair.wait_established()
            p1 = ipv4_udp("198.19.0.2", "198.19.0.1", b"before")
            connector.tun.inject(p1)
            assert await pair.listener.tun.async_wait_packets(1, 5) == [p1]
            # Kill the listener without a CLOSE (crash), then start a new one on the same port.
            old = pair.listener
            old.tunnel.active = None
            old.tunnel.candidates.clear()
            await old.stop()
            pair.listener = make_node(old.config, udp_socket(old.config.port))
            pair.listener.start()
            # Dead-peer detection (3 x KEEPALIVE) + backoff, bounded.
            assert await wait_for(lambda: connector.tunnel.sessions >= 2 and connector.tunnel.established
                                  and pair.listener.tunnel.established, 15)
            p2 = ipv4_udp("198.19.0.2", "198.19.0.1", b"after")
            connector.tun.inject(p2)
            assert await pair.listener.tun.async_wait_packets(1, 5) == [p2]
            # Counters survived the reconnect.
            assert connector.tunnel.counters.tun_rx_packets == 2

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_connector_notices_a_restarted_listener_by_its_closed_port_long_before_dead_peer(engine: Engine) -> None:
    """While the crashed listener's port is closed, the connector's packets draw ICMP port unreachable:
    it PINGs its session, and when the new listener (which knows nothing of it) does not answer, it
    reconnects at once, well before dead-peer detection (3 x 10 s keepalive here)."""
    async def main():
        slow = {"keepalive": 10.0}
        async with worker_pair(engine=engine, listener_kw=slow, connector_kw=slow) as pair:
            connector = pair.connector
            assert await pair.wait_established()
            old = pair.listener
            old.tunnel.active = None
            old.tunnel.candidates.clear()
            await old.stop()  # a crash: no CLOSE
            t0 = asyncio.get_running_loop().time()
            for i in range(5):  # traffic meets the closed port
                connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"lost %d" % i))
                await asyncio.sleep(0.05)
            pair.listener = make_node(old.config, udp_socket(old.config.port))
            pair.listener.start()
            assert await wait_for(lambda: connector.tunnel.sessions >= 2 and connector.tunnel.established
                                  and pair.listener.tunnel.established, 5)
            assert asyncio.get_running_loop().time() - t0 < 5  # dead-peer detection alone takes 30 s
            p2 = ipv4_udp("198.19.0.2", "198.19.0.1", b"after")
            connector.tun.inject(p2)
            assert await pair.listener.tun.async_wait_packets(1, 5) == [p2]

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_connector_hinted_by_a_listener_restarted_at_once_reconnects_long_before_dead_peer(engine: Engine) -> None:
    """The new listener binds before any packet meets a closed port: it answers the old connection's
    packets with RESTART_HINT, the connector's PING goes unanswered and it reconnects."""
    async def main():
        slow = {"keepalive": 10.0}
        async with worker_pair(engine=engine, listener_kw=slow, connector_kw=slow) as pair:
            connector = pair.connector
            assert await pair.wait_established()
            old = pair.listener
            old.tunnel.active = None
            old.tunnel.candidates.clear()
            port = old.config.port
            await old.stop()  # a crash: no CLOSE
            pair.listener = make_node(old.config, udp_socket(port))
            pair.listener.start()
            t0 = asyncio.get_running_loop().time()
            for i in range(5):
                connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"lost %d" % i))
                await asyncio.sleep(0.05)
            assert await wait_for(lambda: connector.tunnel.sessions >= 2 and connector.tunnel.established
                                  and pair.listener.tunnel.established, 5)
            assert asyncio.get_running_loop().time() - t0 < 5  # dead-peer detection alone takes 30 s

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restarted_listener_told_its_predecessors_peer_hints_it_at_start(engine: Engine) -> None:
    """Issue 13: the tunnel is idle toward the listener (the connector sends nothing until its keepalive,
    10 s here), so without a word from the new listener the connector would learn of it only then. Told
    the peer its predecessor last reported (`WorkerConfig.last_peer`), the new listener hints it at once."""
    async def main():
        slow = {"keepalive": 10.0}
        async with worker_pair(engine=engine, listener_kw=slow, connector_kw=slow) as pair:
            connector = pair.connector
            assert await pair.wait_established()
            old = pair.listener
            old.tunnel.active = None
            old.tunnel.candidates.clear()
            port = old.config.port
            await old.stop()  # a crash: no CLOSE
            host, cport = connector.sock.getsockname()[:2]
            config = dataclasses.replace(old.config, last_peer=host, last_peer_port=cport)
            pair.listener = make_node(config, udp_socket(port))
            pair.listener.start()
            t0 = asyncio.get_running_loop().time()
            assert await wait_for(lambda: connector.tunnel.sessions >= 2 and connector.tunnel.established
                                  and pair.listener.tunnel.established, 5)
            assert asyncio.get_running_loop().time() - t0 < 5  # the keepalive would come after 10 s
            p = ipv4_udp("198.19.0.2", "198.19.0.1", b"after")
            connector.tun.inject(p)
            assert await pair.listener.tun.async_wait_packets(1, 5) == [p]

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_hints_do_not_keep_a_failing_probe_alive(engine: Engine) -> None:
    """A new worker on the listener's port answers every packet of the old session with RESTART_HINT
    (each PING retransmission draws one): the probe still ends PROBE_TIMEOUT (+ 3 RTT) after it began,
    not after the last hint, so the connector reconnects while the hints go on."""
    async def main():
        slow = {"keepalive": 10.0}
        async with worker_pair(engine=engine, listener_kw=slow, connector_kw=slow) as pair:
            connector = pair.connector
            assert await pair.wait_established()
            old = pair.listener
            old.tunnel.active = None
            old.tunnel.candidates.clear()
            port = old.config.port
            await old.stop()  # a crash: no CLOSE
            hinter = udp_socket(port)  # a listener that hints and never answers
            target = connector.sock.getsockname()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                while loop.time() - t0 < 2.0 and connector.tunnel.sessions < 2 and connector.tunnel.established:
                    hinter.sendto(RESTART_HINT, target)
                    await asyncio.sleep(0.02)
                ended = loop.time() - t0
            finally:
                hinter.close()
            assert "PING unanswered" in connector.tunnel.last_error or connector.tunnel.state is not \
                SessionState.ESTABLISHED
            assert ended < 1.0, f"the probe lasted {ended:.2f} s under hints every 20 ms"

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_restart_connector_listener_accepts_new_session(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            listener = pair.listener
            assert await pair.wait_established()
            pair.connector.tunnel.active = None  # crash: no CLOSE
            await pair.connector.stop()
            pair.connector = make_node(pair.connector.config, udp_socket())
            pair.connector.start()
            assert await wait_for(lambda: listener.tunnel.sessions >= 2 and listener.tunnel.established
                                  and pair.connector.tunnel.established, 10)
            p = ipv6_udp("fd00::1", "fd00::2", b"resumed")
            listener.tun.inject(p)
            assert await pair.connector.tun.async_wait_packets(1, 5) == [p]

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_two_queues_carry_traffic_independently(engine: Engine) -> None:
    async def main():
        lk, ck = new_keys(), new_keys()
        async with worker_pair(index=0, queue=0, lkeys=lk, ckeys=ck, engine=engine,
                               listener_kw={"queues": 2}, connector_kw={"queues": 2}) as q0:
            async with worker_pair(index=1, queue=1, lkeys=lk, ckeys=ck, engine=engine,
                                   listener_kw={"queues": 2}, connector_kw={"queues": 2}) as q1:
                assert await q0.wait_established() and await q1.wait_established()
                await _exchange(q0, 0)
                await _exchange(q1, 1)
                # Each queue saw only its own packets.
                assert q0.listener.tunnel.counters.tun_tx_packets == 3
                assert q1.listener.tunnel.counters.tun_tx_packets == 3
                # Stopping queue 1 does not disturb queue 0.
                q1.connector.tunnel.stop(ErrorCode.SHUTDOWN, "test")
                await asyncio.sleep(0.2)
                await _exchange(q0, 0)

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_stranger_cannot_disturb_an_established_session(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            stranger_keys = new_keys()
            cfg = make_config(PeerRole.CONNECT, own=stranger_keys, peer_fp=pair.lkeys.fingerprint,
                              port=pair.listener.config.port, engine=engine)
            stranger = make_node(cfg, udp_socket())
            stranger.start()
            try:
                assert await wait_for(lambda: "AUTH_FAILED" in stranger.tunnel.last_error, 10)
                assert lt.sessions == 1 and lt.established
                await _exchange(pair)
                assert stranger.tun.read_all() == [] and stranger.tunnel.counters.tun_tx_packets == 0
            finally:
                await stranger.stop()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_keepalives_carry_counters_to_the_peer(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            await _exchange(pair)
            lt = pair.listener.tunnel
            assert await wait_for(lambda: lt.active.session.peer_counters is not None
                                  and lt.active.session.peer_counters.tx_packets >= 3, 5)
            assert lt.status().rtt_ms > 0

    run(main())


def _eager_engine(payloads: list[bytes], engine: Engine):
    """A connector engine that pushes DATAGRAMs the moment TLS completes (before AUTH)."""
    import dataclasses

    base = load_engine(engine)

    class EagerConnection(base.QuicConnection):
        def next_event(self):
            event = super().next_event()
            if isinstance(event, base.events.HandshakeCompleted):
                for p in payloads:
                    self.send_datagram_frame(p)
            return event

    return dataclasses.replace(base, QuicConnection=EagerConnection)


@contextlib.asynccontextmanager
async def listener_and_stranger(engine: Engine, intruder_engine: Any):
    """A started listener pinned to a key nobody here holds and a started
    connector with another key (`intruder_engine`); both stopped on exit.
    Yields (listener config, listener, intruder)."""
    lk, ck, stranger = new_keys(), new_keys(), new_keys()
    lsock = udp_socket()
    port = lsock.getsockname()[1]
    lcfg = make_config(PeerRole.LISTEN, own=lk, peer_fp=ck.fingerprint, port=port, engine=engine)
    listener = make_node(lcfg, lsock)
    intruder = make_node(make_config(PeerRole.CONNECT, own=stranger, peer_fp=lk.fingerprint, port=port,
                                     engine=engine), udp_socket(), engine=intruder_engine)
    listener.start()
    intruder.start()
    try:
        yield lcfg, listener, intruder
    finally:
        await intruder.stop()
        await listener.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_no_datagram_accepted_from_an_unauthenticated_connector(engine: Engine) -> None:
    async def main():
        packet = ipv4_udp("198.19.0.2", "198.19.0.1", b"smuggled")
        # Any context id: the listener has not even chosen one for this peer.
        payloads = [encode_datagram(ctx, 0, packet) for ctx in range(5)]
        async with listener_and_stranger(engine, _eager_engine(payloads, engine)) as (_, listener, _intruder):
            lt = listener.tunnel
            assert await wait_for(lambda: "AUTH_FAILED" in lt.last_error, 10), lt.last_error
            assert await wait_for(lambda: lt.counters.drops[DropReason.DGRAM_NOT_READY] >= 1, 5)
            await asyncio.sleep(0.2)
            assert listener.tun.read_all() == []
            assert lt.counters.tun_tx_packets == 0 and lt.sessions == 0
            # Counted apart from any session's traffic.
            assert lt.counters.drops[DropReason.DGRAM_NOT_READY] == lt.counters.unauth_rx_packets >= 1
            assert lt.counters.unauth_rx_bytes >= lt.counters.unauth_rx_packets
            assert lt.counters.dgram_rx_packets == lt.counters.dgram_rx_bytes == 0

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_unauthenticated_datagrams_do_not_touch_the_active_sessions_totals_or_key_budget(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            packet = ipv4_udp("198.19.0.2", "198.19.0.1", b"smuggled")
            payloads = [encode_datagram(ctx, 0, packet) for ctx in range(20)]
            cfg = make_config(PeerRole.CONNECT, own=new_keys(), peer_fp=pair.lkeys.fingerprint,
                              port=pair.listener.config.port, engine=engine)
            intruder = make_node(cfg, udp_socket(), engine=_eager_engine(payloads, engine))
            rx_before = (lt.counters.dgram_rx_packets, lt.counters.dgram_rx_bytes)
            budget_before = lt.active.policy.rekey_packets - lt._packets_under_key()
            intruder.start()
            try:
                assert await wait_for(lambda: lt.counters.unauth_rx_packets >= 1, 10)
                assert await wait_for(lambda: "AUTH_FAILED" in intruder.tunnel.last_error, 10)
                await asyncio.sleep(0.2)
                assert (lt.counters.dgram_rx_packets, lt.counters.dgram_rx_bytes) == rx_before
                assert lt.active.policy.rekey_packets - lt._packets_under_key() == budget_before
                assert lt.counters.drops[DropReason.DGRAM_NOT_READY] == lt.counters.unauth_rx_packets
                assert lt.sessions == 1 and lt.established and listener_tun_empty(pair)
            finally:
                await intruder.stop()

    run(main())


def listener_tun_empty(pair) -> bool:
    return pair.listener.tun.read_all() == []


@pytest.mark.parametrize(("lengine", "cengine"), ENGINE_PAIRS)
def test_every_engine_pairing_interoperates(lengine: Engine, cengine: Engine) -> None:
    """A qh3 worker talks to an aioquic worker both ways (AUTO may differ per host)."""
    async def main():
        async with worker_pair(listener_kw={"engine": lengine}, connector_kw={"engine": cengine}) as pair:
            assert await pair.wait_established()
            assert pair.listener.tunnel.engine.name is lengine and pair.connector.tunnel.engine.name is cengine
            await _exchange(pair)
            assert pair.listener.tunnel.counters.total_drops() == 0

    run(main())


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
@pytest.mark.parametrize("engine", ENGINES)
def test_bursts_of_full_size_packets_arrive_in_order(engine: Engine, gso: bool) -> None:
    """Bursts of MTU-size packets (equal-size QUIC packets: the GSO case) arrive whole and in order."""
    async def main():
        async with worker_pair(engine=engine, tunnel_kw={"gso": gso, "gro": gso}) as pair:
            assert await pair.wait_established()
            ct, lt = pair.connector.tunnel, pair.listener.tunnel
            sent: list[bytes] = []
            got: list[bytes] = []
            for burst in range(10):
                packets = [ipv4_udp("198.19.0.2", "198.19.0.1", bytes([burst, i]) * 626) for i in range(32)]
                for p in packets:
                    pair.connector.tun.inject(p)
                sent += packets
                got += await pair.listener.tun.async_wait_packets(len(packets), 5)
            assert got == sent
            assert lt.counters.total_drops() == 0 and ct.counters.total_drops() == 0
            if gso and ct.udp.gso:
                assert ct.udp.gso_segments > 0
            else:
                assert ct.udp.gso_sends == 0 and lt.udp.gro_buffers == 0

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stream_of_packets_on_uvloop_keeps_the_workers_running(engine: Engine) -> None:
    """`event_loop = "uvloop"`: for a deadline under 1 ms away uvloop's `call_at` returns a plain Handle
    (it has no `when()`), which a loaded worker meets at once; the workers must keep running and deliver."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            ct, lt = pair.connector.tunnel, pair.listener.tunnel
            got = 0
            for burst in range(60):
                for i in range(32):
                    pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", bytes([burst, i]) * 600))
                got += len(await pair.listener.tun.async_wait_packets(32, 5))
            assert got == 60 * 32
            assert ct.exit_reason is None and lt.exit_reason is None
            assert ct.established and lt.established and lt.sessions == 1

    uvloop.run(asyncio.wait_for(main(), 45))


@pytest.mark.parametrize(("lengine", "cengine"), ENGINE_PAIRS)
def test_workers_update_keys_by_packet_count_and_by_time(lengine: Engine, cengine: Engine) -> None:
    """Key updates (RFC 9001, 6) every few DATAGRAMs and every fraction of a second, every
    engine pairing: the session survives them all and the keys stay in step.

    qh3 keeps no old keys, so the peer's packets in flight during a qh3 end's
    update are lost (an RTT's worth); the bursts tolerate that, the final
    exchange after the updates stop does not."""
    async def main():
        kw = {"key_update_packets": 40, "key_update_interval": 0.3}
        async with worker_pair(listener_kw={"engine": lengine}, connector_kw={"engine": cengine},
                               tunnel_kw=kw) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            delivered = 0
            for burst in range(4):  # by count: 4 x 30 packets each way
                up = [ipv4_udp("198.19.0.2", "198.19.0.1", bytes([burst, i]) * 40) for i in range(30)]
                down = [ipv6_udp("fd00::1", "fd00::2", bytes([i, burst]) * 60) for i in range(30)]
                for p in up:
                    pair.connector.tun.inject(p)
                for p in down:
                    pair.listener.tun.inject(p)
                got_up = await pair.listener.tun.async_wait_packets(30, 1)
                got_down = await pair.connector.tun.async_wait_packets(30, 1)
                assert set(got_up) <= set(up) and set(got_down) <= set(down)
                delivered += len(got_up) + len(got_down)
            assert delivered >= 120, delivered
            if lengine is cengine is Engine.AIOQUIC:  # both keep their old keys: nothing is lost
                assert delivered == 240
            # An update by either end renews both directions' keys, and an end refuses a
            # new one until its last is acknowledged (RFC 9001, 6.1): count both ends.
            by_count = lt.key_updates + ct.key_updates
            assert by_count >= 3, (lt.key_updates, ct.key_updates)
            await asyncio.sleep(1.2)  # by time: idle but for keepalives
            assert lt.key_updates + ct.key_updates >= by_count + 2, (lt.key_updates, ct.key_updates)
            for t in (lt, ct):  # no more updates: whatever was in flight settles
                t.core.key_update_packets, t.core.key_update_interval = 2**40, 1e9
                t.core.schedule_key_update(t.active.policy, t._now(), t._packets_under_key())
            await asyncio.sleep(0.3)
            await _exchange(pair)  # exactly, both ways: the keys are in step
            assert lt.sessions == ct.sessions == 1
            assert lt.status().key_updates == lt.key_updates

    run(main())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unforeseen_exception_ends_the_worker_cleanly(engine: Engine) -> None:
    """A bug in a loop callback does not leave a half-working worker behind (asyncio
    would log and go on): the tunnel ends with the reason, the peer gets CLOSE."""
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            errors: list[dict] = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

            def boom(*_a, **_kw):
                raise _Boom("boom")

            lt._write_tun = boom  # the first packet from the peer raises inside the UDP callback
            pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"x"))
            await asyncio.wait_for(asyncio.shield(pair.listener.task), 5)  # run() returned
            assert lt.exit_reason == "internal error in _on_udp_readable: _Boom('boom')"
            assert isinstance(errors[0]["exception"], _Boom)
            assert await wait_for(lambda: "INTERNAL" in ct.last_error, 5), ct.last_error
            assert not ct.established

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_advertise_sends_route_update_and_widens_local_sources(engine: Engine) -> None:
    """A reload that changed only the advertised routes reaches the peer as a
    ROUTE_UPDATE in the same session, and the TUN may send from the new prefix."""
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            changes: list = []
            ct.on_routes = lambda _session, change: changes.append(change)
            from_new = ipv4_udp("198.19.30.1", "198.19.0.2", b"from behind")
            pair.listener.tun.inject(from_new)
            assert await wait_for(lambda: lt.counters.drops[DropReason.TUN_SRC_NOT_ALLOWED] == 1, 5)
            sent = lt.counters.dgram_tx_packets
            lt.advertise(("198.19.30.0/24",), (*lt.params.local_sources, "198.19.30.0/24"))
            assert await wait_for(lambda: bool(changes), 5)
            assert changes[-1].routes == ("198.19.30.0/24",) and changes[-1].epoch == 2
            pair.listener.tun.inject(from_new)
            assert await wait_for(lambda: lt.counters.dgram_tx_packets == sent + 1, 5)
            assert lt.counters.drops[DropReason.TUN_SRC_NOT_ALLOWED] == 1
            assert lt.sessions == ct.sessions == 1

    run(main())


@pytest.mark.parametrize("how", ["close", "connection_close"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_strangers_close_reason_never_reaches_status(engine: Engine, how: str) -> None:
    """While the real peer is away, a client with a wrong key closes with a
    reason full of terminal escapes: the listener's last_error (what status
    shows) records that a peer closed, never the stranger's words."""
    from l3ptp.worker.app import status_message

    async def main():
        async with listener_and_stranger(engine, closing_engine(engine, how)) as (lcfg, listener, _intruder):
            lt = listener.tunnel
            assert await wait_for(lambda: "withheld" in lt.last_error, 10), lt.last_error
            for text in (lt.last_error, status_message(lcfg, lt).last_error):
                assert "owned" not in text and "\x1b" not in text and "\\x1b" not in text
            assert lt.sessions == 0

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_an_authenticated_peers_close_reason_is_kept_escaped(engine: Engine) -> None:
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            ct, lt = pair.connector.tunnel, pair.listener.tunnel
            send_close(ct, HOSTILE)
            assert await wait_for(lambda: HOSTILE_SHOWN in lt.last_error, 5), lt.last_error
            assert lt.last_error == f"peer closed: SHUTDOWN: {HOSTILE_SHOWN}"
            assert lt.last_error.isprintable()

    run(main())


# ---- handshake floods (issue 14) ----------------------------------------------------


def _counting_engine(engine: Engine, built: list[object]):
    """The engine, with every QuicConfiguration it builds recorded."""
    import dataclasses

    base = load_engine(engine)

    class CountingConfiguration(base.QuicConfiguration):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    return dataclasses.replace(base, QuicConfiguration=CountingConfiguration)


async def _flood_in_thread(port: int, *, mode: str, seconds: float, ports: int = 32) -> tuple[int, float]:
    from tests.support.flood import flood

    return await asyncio.to_thread(flood, "127.0.0.1", port, mode=mode, ports=ports, seconds=seconds, templates=16)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["junk", "replay"])
def test_handshake_flood_leaves_the_session_working_and_the_listener_bounded(engine: Engine, mode: str) -> None:
    """Initial-looking junk, or real Initials replayed, from 32 source ports:
    the established session keeps carrying packets, the TLS configuration is
    built once, candidates stay within MAX_CANDIDATES and expire, and the
    refusals are counted under their names."""
    from l3ptp.ipc.constants import MAX_CANDIDATES

    async def main():
        built: list[object] = []
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            lt.engine = _counting_engine(engine, built)
            lt._configs.clear()
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, len(lt.candidates))
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            flooding = asyncio.create_task(_flood_in_thread(pair.listener.config.port, mode=mode, seconds=1.5))
            try:
                await asyncio.sleep(0.3)
                await _exchange(pair)  # during the flood
                sent, _ = await flooding
            finally:
                watcher.cancel()
            assert sent > 1000
            await _exchange(pair)
            assert lt.sessions == 1 and lt.established and pair.connector.tunnel.sessions == 1
            assert peak <= MAX_CANDIDATES
            assert len(built) == 1  # one server configuration for every attempt
            d = lt.counters.drops
            refused = d[DropReason.INITIAL_RETRY] + d[DropReason.INITIAL_OVER_BUDGET]
            assert refused > 0, d
            # Junk candidates die with their session timer: the table empties.
            assert await wait_for(lambda: not lt.candidates, 10), lt.candidates
            assert lt.counters.dgram_rx_packets == lt.counters.tun_tx_packets  # no stray DATAGRAM counted

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_restarted_peer_reconnects_through_retry_while_the_candidate_table_is_full(engine: Engine) -> None:
    """Replayed Initials fill the candidate table; a restarted connector (new
    port) gets a Retry, comes back with the token and replaces the session."""
    from l3ptp.ipc.constants import MAX_CANDIDATES
    from tests.support.flood import real_initials

    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            port = pair.listener.config.port
            socks = [udp_socket() for _ in range(MAX_CANDIDATES)]
            lt.admission.sources.clear()  # the first session spent one of 127.0.0.1's budget
            try:
                for s, data in zip(socks, real_initials(MAX_CANDIDATES, ("127.0.0.1", port)), strict=True):
                    s.sendto(data, ("127.0.0.1", port))
                assert await wait_for(lambda: len(lt.candidates) == MAX_CANDIDATES, 5)
                await pair.connector.stop()
                retries = lt.counters.drops[DropReason.INITIAL_RETRY]
                pair.connector = make_node(pair.connector.config, udp_socket())
                pair.connector.start()
                assert await wait_for(lambda: lt.sessions == 2 and lt.established, 10), lt.last_error
                assert lt.counters.drops[DropReason.INITIAL_RETRY] > retries  # it came back with the token
                await _exchange(pair)
            finally:
                for s in socks:
                    s.close()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_listener_reveals_no_configured_timer_in_transport_parameters(engine: Engine) -> None:
    """max_idle_timeout is the fixed QUIC_IDLE_TIMEOUT, whatever the keepalive."""
    from l3ptp.ipc.constants import QUIC_IDLE_TIMEOUT

    async def main():
        for keepalive in (0.5, 2.0):
            # An aioquic connector reads what the listener (either engine) announced.
            async with worker_pair(listener_kw={"keepalive": keepalive, "engine": engine},
                                   connector_kw={"engine": Engine.AIOQUIC}) as pair:
                assert await pair.wait_established()
                assert pair.connector.tunnel.active.conn._remote_max_idle_timeout == QUIC_IDLE_TIMEOUT

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("failure", ["unpinned key", "network", "endpoint"])
def test_a_stranger_learns_only_authentication_failed(engine: Engine, failure: str) -> None:
    """Whatever is wrong, the stranger hears one code and one reason, on the
    stream and in the QUIC close; the listener keeps the detail for its log."""
    async def main():
        async with worker_pair(engine=engine) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            own = new_keys() if failure == "unpinned key" else pair.ckeys
            cfg = make_config(PeerRole.CONNECT, own=own, peer_fp=pair.lkeys.fingerprint,
                              port=pair.listener.config.port, engine=engine,
                              network="other" if failure == "network" else "net0",
                              queue=1 if failure == "endpoint" else 0, queues=2)
            stranger = make_node(cfg, udp_socket())
            heard: list[object] = []
            stranger.tunnel._new_session = _recording_sessions(stranger.tunnel._new_session, heard)
            stranger.start()
            try:
                assert await wait_for(lambda: "AUTH_FAILED" in stranger.tunnel.last_error, 10)
                assert stranger.tunnel.last_error.endswith("authentication failed"), stranger.tunnel.last_error
                assert [type(m).__name__ for m in heard if type(m).__name__ != "Close"] == ["Challenge"]
                assert lt.sessions == 1 and lt.established
            finally:
                await stranger.stop()

    run(main())


def _recording_sessions(new_session, heard: list[object]):
    """Wrap Tunnel._new_session so that every message a session receives is recorded."""
    def make(now):
        session = new_session(now)
        receive = session.receive

        def recording(msg, t):
            heard.append(msg)
            return receive(msg, t)

        session.receive = recording
        return session

    return make


@pytest.mark.parametrize("engine", ENGINES)
def test_candidates_expire_and_junk_at_a_candidates_address_is_bounded(engine: Engine, monkeypatch) -> None:
    """A candidate that does not reach ESTABLISHED is gone after
    CANDIDATE_LIFETIME even when the dead-peer timer is far away; datagrams
    to its address beyond what a handshake needs, Initials with another DCID,
    an empty datagram: all handled without harm and counted."""
    from l3ptp.ipc.constants import CANDIDATE_DATAGRAMS_MAX
    from l3ptp.worker import core as core_mod
    from tests.support.flood import junk_initial, real_initials

    monkeypatch.setattr(core_mod, "CANDIDATE_LIFETIME", 0.5)

    async def main():
        lk, ck = new_keys(), new_keys()
        lsock = udp_socket()
        port = lsock.getsockname()[1]
        listener = make_node(make_config(PeerRole.LISTEN, own=lk, peer_fp=ck.fingerprint, port=port, engine=engine,
                                         keepalive=20.0), lsock)
        listener.start()
        sock = udp_socket()
        try:
            lt = listener.tunnel
            (initial,) = real_initials(1, ("127.0.0.1", port))
            sock.sendto(initial, ("127.0.0.1", port))
            assert await wait_for(lambda: len(lt.candidates) == 1, 5)
            sock.sendto(b"", ("127.0.0.1", port))
            for _ in range(CANDIDATE_DATAGRAMS_MAX + 5):
                sock.sendto(junk_initial(), ("127.0.0.1", port))  # another DCID each
            assert await wait_for(lambda: lt.counters.drops[DropReason.INITIAL_TO_CANDIDATE] >= CANDIDATE_DATAGRAMS_MAX, 5)
            assert await wait_for(lambda: not lt.candidates, 3), "the candidate did not expire"
            assert lt.exit_reason is None and lt.state is not SessionState.STOPPED
        finally:
            sock.close()
            await listener.stop()

    run(main())
