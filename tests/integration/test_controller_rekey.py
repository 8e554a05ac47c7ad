"""Issue 18, item 3, the controller's side: a reload that changes pinned peer keys, the key file (its path or
its contents) or accepted_routes is applied to the running workers (Rekey on the bus; routes judged again),
never by restarting them; a key file that cannot be read refuses the reload and changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from l3ptp.ipc.control_messages import BUS_DOWN, PeerRoutes, Rekey
from l3ptp.ipc.helper_messages import RemoveRoutes
from tests.integration.test_controller_app import KEY, make_config, running, until
from tests.support.config_builders import KEY_A, KEY_B, office

KEY2 = bytes(range(100, 132))


async def rekey_to(env: Any, pid: int) -> Rekey:
    while True:
        msg = BUS_DOWN.decode_untrusted(await asyncio.wait_for(env.worker(pid).recv(), 5))
        if isinstance(msg, Rekey):
            return msg


def test_a_reload_of_keys_and_accepted_routes_is_applied_to_the_running_workers() -> None:
    async def body() -> None:
        nets = {"office": office(queues=2, accepted_routes=["198.19.8.0/21"])}
        async with running(nets) as env:
            procs = {p.queue: p for p in env.spawner.live("office")}
            pids = {p.pid for p in procs.values()}
            for p in procs.values():
                await env.report(p.pid)
            await env.say(procs[0].pid, PeerRoutes(network="office", queue=0, session=1, epoch=1,
                                                   routes=("198.19.8.0/24", "198.19.9.0/24"), tunnel_addresses=()))
            await until(lambda: env.helper.networks["office"].routes == ["198.19.8.0/24", "198.19.9.0/24"])

            # 1. A second pinned key and narrower accepted routes: live, no restart.
            new = make_config(env.runtime, {"office": office(queues=2, accepted_routes=["198.19.8.0/24"],
                                                             peer_keys=[KEY_A, KEY_B])})
            result = await env.controller.apply(new)
            assert result.ok and result.message == "applied live: office", result.message
            assert {p.pid for p in env.spawner.live("office")} == pids
            for queue, p in procs.items():
                got = await rekey_to(env, p.pid)
                assert (got.queue, got.private_key, got.peer_keys) == (queue, KEY, (KEY_A, KEY_B))
                assert "198.19.8.0/24" in got.peer_sources and "198.19.8.0/21" not in got.peer_sources
            # The peer's routes are judged again: the one now outside accepted_routes goes.
            await until(lambda: env.helper.networks["office"].routes == ["198.19.8.0/24"])
            assert any(isinstance(r, RemoveRoutes) and r.routes == ("198.19.9.0/24",) for r in env.helper.requests)

            # 2. The same key file with new contents: the workers get the new key.
            env.controller.key_loader = lambda path: KEY2
            result = await env.controller.apply(new)
            assert result.ok and result.message == "applied live: office", result.message
            for p in procs.values():
                assert (await rekey_to(env, p.pid)).private_key == KEY2
            # Nothing changed at all: nothing is sent.
            result = await env.controller.apply(new)
            assert result.ok and result.message == "unchanged: office"

            # 3. A key file that cannot be read: refused, nothing changes.
            def unreadable(path: str) -> bytes:
                raise PermissionError(13, "Permission denied", path)

            env.controller.key_loader = unreadable
            other = make_config(env.runtime, {"office": office(queues=2, accepted_routes=["198.19.8.0/21"])})
            result = await env.controller.apply(other)
            assert not result.ok and "nothing changed" in result.message
            assert "cannot read key file /etc/l3ptp/node.key" in result.errors[0]
            assert env.controller.config is new and {p.pid for p in env.spawner.live("office")} == pids

    asyncio.run(body())


def test_a_worker_that_was_not_on_the_bus_at_the_reload_is_rekeyed_on_its_first_message() -> None:
    async def body() -> None:
        async with running({"office": office(queues=2)}) as env:
            procs = {p.queue: p for p in env.spawner.live("office")}
            await env.report(procs[0].pid)  # queue 1 is not on the bus yet
            await asyncio.sleep(0.2)
            env.controller.key_loader = lambda path: KEY2
            result = await env.controller.apply(make_config(env.runtime, {"office": office(queues=2)}))
            assert result.ok and result.message == "applied live: office"
            assert (await rekey_to(env, procs[0].pid)).private_key == KEY2
            await env.report(procs[1].pid)
            assert (await rekey_to(env, procs[1].pid)).private_key == KEY2
            # A worker started after the reload gets the key in its configuration, and no Rekey.
            assert env.controller.networks["office"].keyed[1] == env.controller.networks["office"].keying()

    asyncio.run(body())


def test_status_shows_renewals_and_the_key_each_peer_proved() -> None:
    from l3ptp.ipc.control_messages import SessionState, WorkerStatus

    async def body() -> None:
        async with running({"office": office(queues=2)}) as env:
            for p in env.spawner.live("office"):
                await env.say(p.pid, WorkerStatus(
                    network="office", queue=p.queue, pid=p.pid, state=SessionState.ESTABLISHED,
                    peer=f"198.18.0.2:{40000 + p.queue}", rtt_ms=1.0, mtu=1280,
                    counters={"renewals": 1, "renew_failures": p.queue, "path_migrations": 1}, drops={},
                    queue_depth=0, seq_lost=0, sessions=2, key_updates=0, peer_key=KEY_B, last_error=""))
            await until(lambda: len(env.controller.networks["office"].reports) == 2)
            rc, out, _ = await env.cli("status")
            assert rc == 0
            from l3ptp.worker import keys

            ours = keys.fingerprint(keys.private_key_from_raw(KEY))
            assert "renewals: 2, failed 1" in out and f"peer key: {KEY_B}, our key: {ours}" in out
            assert "path migrations: 2" in out and "path: 198.18.0.2:40000, 198.18.0.2:40001" in out
            rc, out, _ = await env.cli("status", "-v")
            assert out.count(f"peer key {KEY_B}") == 2 and "peer 198.18.0.2:40001" in out

    asyncio.run(body())
