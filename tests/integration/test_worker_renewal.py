"""Issue 18, item 3: keys rotated on running workers (`Tunnel.rekey`, what a reload sends on the bus) move
the session to a new connection without a gap (worker/renewal.py): no packet lost either way, no restart;
a renewal that fails leaves the running session alone; a peer key no longer pinned ends the session after
the grace."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.worker import renewal
from l3ptp.worker.tunnel import Tunnel
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import ENGINES, NodeKeys, new_keys, wait_for, worker_pair

pytestmark = pytest.mark.timeout(90)


def rekey(tunnel: Tunnel, *, own: NodeKeys | None = None, pins: tuple[str, ...] | None = None,
          not_after: tuple[float, ...] | None = None) -> None:
    cfg = tunnel.config
    keys = pins if pins is not None else (cfg.peer_keys or (cfg.peer_key,))
    tunnel.rekey(private_key=own.raw if own is not None else cfg.private_key, peer_key=keys[0], peer_keys=keys,
                 peer_keys_not_after=not_after or (0.0,) * len(keys), peer_sources=cfg.peer_sources)


class Traffic:
    """A numbered packet each way every 5 ms until stopped; `lost()` says which never arrived."""

    def __init__(self, pair: Any) -> None:
        self.pair, self.sent_up, self.sent_down = pair, [], []
        self.got_up: list[bytes] = []
        self.got_down: list[bytes] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while True:
            up = ipv4_udp("198.19.0.2", "198.19.0.1", i.to_bytes(4, "big") * 10)
            down = ipv4_udp("198.19.0.1", "198.19.0.2", i.to_bytes(4, "big") * 10)
            self.pair.connector.tun.inject(up)
            self.pair.listener.tun.inject(down)
            self.sent_up.append(up)
            self.sent_down.append(down)
            i += 1
            await asyncio.sleep(0.005)
            self.got_up += self.pair.listener.tun.read_all()
            self.got_down += self.pair.connector.tun.read_all()

    async def stop(self) -> tuple[int, int, int]:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.sleep(0.3)
        self.got_up += self.pair.listener.tun.read_all()
        self.got_down += self.pair.connector.tun.read_all()
        lost_up = len(set(self.sent_up) - set(self.got_up))
        lost_down = len(set(self.sent_down) - set(self.got_down))
        return len(self.sent_up), lost_up, lost_down


@pytest.mark.parametrize("shared", [False, True], ids=["one-queue", "queue-1-of-3-shared-port"])
@pytest.mark.parametrize("engine", ENGINES)
def test_both_ends_rotate_their_keys_under_traffic_without_losing_a_packet(engine: Engine, shared: bool) -> None:
    """`shared`: queue 1 of 3 on a shared port, the CIDs of every connection (the successors' too) pinned to the
    queue, datagrams of other queues dropped (worker/steering.py): renewal works the same."""
    pin = {"queues": 3} if shared else {}

    async def main() -> None:
        l2, c2 = new_keys(), new_keys()
        async with worker_pair(engine=engine, queue=1 if shared else 0, listener_kw=pin, connector_kw=pin) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            traffic = Traffic(pair)
            await asyncio.sleep(0.2)
            # 1. Both pin old and new: nothing to renew.
            rekey(lt, pins=(pair.ckeys.fingerprint, c2.fingerprint))
            rekey(ct, pins=(pair.lkeys.fingerprint, l2.fingerprint))
            await asyncio.sleep(0.3)
            assert (lt.renewals, ct.renewals, lt.sessions, ct.sessions) == (0, 0, 1, 1)
            # 2. The connector's new key: it renews by itself.
            rekey(ct, own=c2)
            assert await wait_for(lambda: ct.renewals == 1 and lt.renewals == 1, 10)
            assert lt.active is not None and lt.active.session.peer_fingerprint == c2.fingerprint
            # 3. The listener's new key: it asks (RENEW), the connector renews.
            rekey(lt, own=l2)
            assert await wait_for(lambda: ct.renewals == 2 and lt.renewals == 2, 10)
            assert ct.active is not None and ct.active.session.peer_fingerprint == l2.fingerprint
            # 4. The old keys go: the sessions use the new ones already.
            rekey(lt, pins=(c2.fingerprint,))
            rekey(ct, pins=(l2.fingerprint,))
            await asyncio.sleep(renewal.RETIRE_DRAIN + 0.5)  # the replaced connections are closed by now
            sent, lost_up, lost_down = await traffic.stop()
            assert sent > 200
            assert (lost_up, lost_down) == (0, 0)
            assert (lt.renewals, ct.renewals, ct.renew_failures) == (2, 2, 0)
            assert lt.sessions == ct.sessions == 3 and lt.established and ct.established
            assert not lt.retiring and not ct.retiring and ct.successor is None
            assert lt.renewal_counters() == {"renewals": 2, "renew_failures": 0}
            # The workers' reports carry them, and the key the peer proved.
            from l3ptp.worker.app import status_message

            report = status_message(pair.connector.config, ct)
            assert report.counters["renewals"] == 2 and report.peer_key == l2.fingerprint
            assert status_message(pair.listener.config, lt).drops["dgram_wrong_queue"] == 0

    asyncio.run(asyncio.wait_for(main(), 80))


def test_a_renewal_the_peer_refuses_leaves_the_running_session_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(renewal, "RENEW_RETRY", 0.3)

    async def main() -> None:
        c3 = new_keys()
        async with worker_pair() as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            rekey(ct, own=c3)  # the listener does not pin c3
            assert await wait_for(lambda: ct.renew_failures >= 2, 10)  # tried again after RENEW_RETRY
            assert "renewal failed" in ct.last_error
            assert ct.established and lt.established and ct.sessions == lt.sessions == 1
            p = ipv4_udp("198.19.0.2", "198.19.0.1", b"still carried by the old session")
            pair.connector.tun.inject(p)
            assert await pair.listener.tun.async_wait_packets(1, 2) == [p]
            # The listener starts to pin c3: the next attempt succeeds.
            rekey(lt, pins=(pair.ckeys.fingerprint, c3.fingerprint))
            assert await wait_for(lambda: ct.renewals == 1 and lt.renewals == 1, 10)  # the listener switches on READY, later
            assert lt.active is not None and lt.active.session.peer_fingerprint == c3.fingerprint

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_peer_key_no_longer_pinned_ends_the_session_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(renewal, "RENEW_GRACE", 0.5)

    async def main() -> None:
        from structlog.testing import capture_logs

        async with worker_pair() as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            with capture_logs() as logs:
                rekey(lt, pins=(new_keys().fingerprint,))  # the connector's key is no longer pinned
                # RENEW: the connector tries, the listener refuses its (old) key; then the grace ends it.
                assert await wait_for(lambda: ct.renew_failures >= 1, 10)
                assert await wait_for(lambda: lt.sessions == 1 and not lt.established, 5)
                await asyncio.sleep(1.0)
            assert not lt.established  # and no way back in with that key
            ended = [e["reason"] for e in logs if e["event"] == "session_ended" and e.get("peer")]
            assert any("AUTH_FAILED: the peer's key is no longer pinned" in r for r in ended), ended

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_pinned_key_past_its_not_after_time_ends_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(renewal, "RENEW_GRACE", 0.3)

    async def main() -> None:
        import time

        async with worker_pair() as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            rekey(lt, pins=(pair.ckeys.fingerprint,), not_after=(time.time() + 0.5,))
            await asyncio.sleep(0.2)
            assert lt.established  # still within its time
            assert await wait_for(lambda: not lt.established, 5)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_peer_asking_again_and_again_gets_one_renewal_per_retry_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(renewal, "RENEW_RETRY", 3.0)

    async def main() -> None:
        async with worker_pair() as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            loop = asyncio.get_running_loop()
            for _ in range(10):  # an authenticated listener that keeps sending RENEW
                lt.renew(loop.time(), "again")
                await asyncio.sleep(0.15)
            assert ct.renewals == 1 and ct.sessions == 2  # the first at once, the rest wait for RENEW_RETRY
            assert await wait_for(lambda: ct.renewals == 2, 5)  # one more after the interval, not ten

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_reality_connector_renews_through_the_gate() -> None:
    """The successor's first flight is sealed like any other: the REALITY gate lets it through."""
    from tests.integration.test_worker_reality import reality_kw

    async def main() -> None:
        c2 = new_keys()
        lkw, ckw = reality_kw()
        async with worker_pair(listener_kw=lkw, connector_kw=ckw) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            rekey(lt, pins=(pair.ckeys.fingerprint, c2.fingerprint))
            rekey(ct, own=c2)
            assert await wait_for(lambda: ct.renewals == 1 and lt.renewals == 1, 10)
            assert lt.active is not None and lt.active.session.peer_fingerprint == c2.fingerprint
            assert lt.reality is not None and lt.reality.counters()["reality_passed"] == 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_key_changed_again_while_a_renewal_is_on_its_way_is_renewed_once_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The successor was started with the key of the first reload; the second reload's key must not be lost
    when that successor takes over (and the same for the listener's key during a connector's renewal)."""
    monkeypatch.setattr(renewal, "RENEW_RETRY", 0.5)

    async def main() -> None:
        c2, c3, l2 = new_keys(), new_keys(), new_keys()
        async with worker_pair() as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            rekey(lt, pins=(pair.ckeys.fingerprint, c2.fingerprint, c3.fingerprint))
            rekey(ct, pins=(pair.lkeys.fingerprint, l2.fingerprint))
            rekey(ct, own=c2)
            rekey(ct, own=c3)  # before the successor with c2 is established
            rekey(lt, own=l2)  # and the listener's own key during that handshake
            assert await wait_for(lambda: lt.active is not None and ct.active is not None
                                  and lt.active.session.peer_fingerprint == c3.fingerprint
                                  and ct.active.session.peer_fingerprint == l2.fingerprint, 15)
            assert lt.established and ct.established and ct.renew_failures == 0

    asyncio.run(asyncio.wait_for(main(), 60))
