"""Issue 15 in the worker: a REALITY listener and connector over loopback (both engines). The tunnel runs
with an HTTP/3 ALPN and a sealed first flight; a stranger's Initial gets no answer without a target, and is
relayed to the target with one; a connector with the wrong REALITY key never gets through."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.types import PeerRole
from l3ptp.worker import reality
from l3ptp.worker.reality_link import HTTP3_ALPN
from tests.support.packets import ipv4_udp
from tests.support.quic_initial import aioquic_client
from tests.support.worker_fixtures import ENGINES, make_config, make_node, new_keys, udp_socket, wait_for, worker_pair

pytestmark = pytest.mark.timeout(60)

LISTENER = reality.Credential(private_key=os.urandom(32))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 45))


def reality_kw(*, target: tuple[str, int] | None = None, public: bytes | None = None) -> tuple[dict, dict]:
    lkw = {"reality_key": LISTENER.private_key, "reality_short_ids": (b"\x01\x02",)}
    if target is not None:
        lkw |= {"camouflage_host": target[0], "camouflage_port": target[1]}
    ckw = {"reality_key": public or LISTENER.public_key, "reality_short_ids": (b"\x01\x02",),
           "server_name": "www.site.test"}
    return lkw, ckw


def stranger_initial(sock: socket.socket, port: int) -> bytes:
    first = aioquic_client(["h3"], server_name="www.site.test")[1][0]
    sock.sendto(first, ("127.0.0.1", port))
    return first


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reality_tunnel_carries_packets_with_an_http3_alpn(engine: Engine) -> None:
    async def main() -> None:
        lkw, ckw = reality_kw()
        async with worker_pair(engine=engine, listener_kw=lkw, connector_kw=ckw) as pair:
            assert await pair.wait_established()
            pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"through the seal"))
            assert await pair.listener.tun.async_wait_packets(1, 5) == [ipv4_udp("198.19.0.2", "198.19.0.1",
                                                                                   b"through the seal")]
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            assert lt.reality is not None and lt.reality.counters()["reality_passed"] == 1
            assert ct._configuration(True).alpn_protocols == [HTTP3_ALPN]
            assert ct._configuration(True).server_name == "www.site.test"
            assert lt._configuration(False).alpn_protocols == [HTTP3_ALPN]
            from l3ptp.worker.app import status_message

            status = status_message(pair.listener.config, lt)  # the counters reach the controller's report
            assert status.counters["reality_passed"] == 1 and status.counters["reality_pending_senders"] == 0

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_without_a_target_a_stranger_gets_no_answer_and_the_tunnel_is_undisturbed(engine: Engine) -> None:
    async def main() -> None:
        lkw, ckw = reality_kw()
        async with worker_pair(engine=engine, listener_kw=lkw, connector_kw=ckw) as pair:
            assert await pair.wait_established()
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind(("127.0.0.1", 0))
            stranger.setblocking(False)
            port = pair.listener.sock.getsockname()[1]
            stranger_initial(stranger, port)
            stranger.sendto(b"\x40" + os.urandom(40), ("127.0.0.1", port))  # a short header: no RESTART_HINT
            await asyncio.sleep(0.5)
            with pytest.raises(BlockingIOError):
                stranger.recv(65535)
            counters = pair.listener.tunnel.reality.counters()
            assert counters["reality_refused_bad_tag"] == 1 and counters["reality_refused_not_initial"] == 1
            assert counters.get("reality_passed") == 1  # the peer only
            pair.connector.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"still here"))
            assert await pair.listener.tun.async_wait_packets(1, 5)
            stranger.close()

    run(main())


def test_with_a_target_a_stranger_is_relayed_to_it_and_the_answers_come_back_from_the_listener() -> None:
    async def main() -> None:
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands for the camouflage site: echoes
        target.bind(("127.0.0.1", 0))
        target.setblocking(False)
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []

        def echo() -> None:
            data, addr = target.recvfrom(65535)
            seen.append(data)
            target.sendto(b"target says: " + data[:20], addr)

        loop.add_reader(target.fileno(), echo)
        lkw, ckw = reality_kw(target=target.getsockname())
        async with worker_pair(engine=Engine.AIOQUIC, listener_kw=lkw, connector_kw=ckw) as pair:
            assert await pair.wait_established()
            assert await wait_for(lambda: pair.listener.tunnel.reality.camouflage.relay is not None, 5)
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind(("127.0.0.1", 0))
            port = pair.listener.sock.getsockname()[1]
            first = stranger_initial(stranger, port)
            stranger.settimeout(5)
            answer, source = await asyncio.to_thread(stranger.recvfrom, 65535)
            assert answer == b"target says: " + first[:20] and source == ("127.0.0.1", port)
            assert seen == [first]
            stranger.sendto(b"and more", ("127.0.0.1", port))  # the flow is known now: relayed as it is
            answer, _ = await asyncio.to_thread(stranger.recvfrom, 65535)
            assert answer == b"target says: and more"
            counters = pair.listener.tunnel.reality.counters()
            assert counters["relay_flows"] == 1 and counters["relay_up_packets"] == 2
            assert counters["relay_down_packets"] == 2 and counters["reality_refused_bad_tag"] == 1
            stranger.close()
        loop.remove_reader(target.fileno())
        target.close()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_connector_with_the_wrong_reality_key_never_gets_through(engine: Engine) -> None:
    async def main() -> None:
        lkw, ckw = reality_kw(public=reality.Credential(os.urandom(32)).public_key)
        async with worker_pair(engine=engine, listener_kw=lkw, connector_kw=ckw) as pair:
            assert not await pair.wait_established(1.5)
            counters = pair.listener.tunnel.reality.counters()
            assert counters.get("reality_refused_bad_tag", 0) >= 1 and "reality_passed" not in counters
            assert not pair.listener.tunnel.candidates  # nothing reached the engine

    run(main())


def test_a_camouflage_target_that_is_the_listener_itself_is_refused_not_looped() -> None:
    async def main() -> None:
        lsock = udp_socket()
        port = lsock.getsockname()[1]
        lkw, _ = reality_kw(target=("127.0.0.1", port))
        cfg = make_config(PeerRole.LISTEN, own=new_keys(), peer_fp=new_keys().fingerprint, port=port, **lkw)
        node = make_node(cfg, lsock)
        node.start()
        try:
            rl = node.tunnel.reality
            assert await wait_for(lambda: not rl.has_target, 5)
            assert rl.camouflage.relay is None and rl.camouflage.gate.camouflage is False
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind(("127.0.0.1", 0))
            stranger_initial(stranger, port)
            await asyncio.sleep(0.3)
            assert rl.counters()["reality_refused_bad_tag"] == 1 and "relay_flows" not in rl.counters()
            stranger.close()
        finally:
            await node.stop()

    run(main())
