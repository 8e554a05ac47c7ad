"""A real Controller (zmq sockets, asyncio) with the fake helper and fake spawner.

Workers are simulated by zmq DEALER sockets that speak BUS_UP, exactly like
worker/app.py's control link; the CLI is the real `l3ptp` code.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import zmq
import zmq.asyncio

from l3ptp.controller import cli
from l3ptp.controller.app import Controller
from l3ptp.controller.config import Config, parse_config
from l3ptp.ipc.constants import HANDOVER_GRACE, RESTART_BACKOFF_MIN
from l3ptp.ipc.control_messages import (
    BUS_DOWN,
    BUS_UP,
    Advertise,
    Handover,
    PeerRoutes,
    Rekey,
    Shutdown,
    SessionState,
    WorkerHello,
    WorkerStatus,
)
from l3ptp.ipc.helper_messages import AddRoutes, CreateNetwork, DestroyNetwork, RemoveRoutes
from tests.support.fake_helper import FakeHelper
from tests.support.fake_spawner import FakeSpawner
from tests.support.config_builders import config, lab, office

KEY = bytes(range(32))


def make_config(runtime: str, networks: dict[str, Any] | None = None) -> Config:
    nets = networks if networks is not None else {"office": office(queues=2, accepted_routes=["198.19.8.0/21"])}
    return parse_config(
        config(
            nets,
            controller={"runtime_dir": runtime, "helper_socket": os.path.join(runtime, "helper.sock")},
            metrics={"enabled": False},
        )
    )


class Env:
    def __init__(self, controller: Controller, helper: FakeHelper, runtime: str) -> None:
        self.controller = controller
        self.helper = helper
        self.runtime = runtime
        self.ctx = zmq.asyncio.Context()
        self.workers: dict[int, zmq.asyncio.Socket] = {}

    @property
    def spawner(self) -> FakeSpawner:
        assert isinstance(self.controller.spawner, FakeSpawner)
        return self.controller.spawner

    def worker(self, pid: int) -> zmq.asyncio.Socket:
        if pid not in self.workers:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{self.controller.bus_path}")
            self.workers[pid] = sock
        return self.workers[pid]

    async def say(self, pid: int, msg: Any) -> None:
        await self.worker(pid).send(BUS_UP.encode(msg))

    async def report(self, pid: int, state: SessionState = SessionState.ESTABLISHED, packets: int = 10) -> None:
        proc = self.spawner.processes[pid]
        await self.say(
            pid,
            WorkerStatus(
                network=proc.network,
                queue=proc.queue,
                pid=pid,
                state=state,
                peer="198.18.0.2:4433",
                rtt_ms=1.5,
                mtu=1280,
                counters={"tun_rx_packets": packets, "tun_rx_bytes": packets * 100},
                drops={"dgram_bad_header": 1},
                queue_depth=0,
                seq_lost=0,
                sessions=2,
                key_updates=3,
                last_error="",
            ),
        )

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = await asyncio.to_thread(cli.main, ["--runtime-dir", self.runtime, *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def close(self) -> None:
        for sock in self.workers.values():
            sock.close(linger=0)
        self.ctx.term()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(
    networks: dict[str, Any] | None = None,
    config_path: str | None = None,
    prefill: Callable[[FakeHelper], None] | None = None,
    before_ready: Callable[[Controller], Awaitable[None]] | None = None,
    crashed: bool = False,
) -> AsyncIterator[Env]:
    # Short path: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="l3c-") as tmp:
        runtime = os.path.join(tmp, "run")
        os.mkdir(runtime)
        helper = FakeHelper()
        if prefill is not None:
            prefill(helper)
        await helper.serve_path(os.path.join(runtime, "helper.sock"))
        if crashed:  # the previous controller left its bus socket behind
            open(os.path.join(runtime, "workers.sock"), "w").close()
        controller = Controller(
            make_config(runtime, networks),
            config_path=config_path,
            spawner_factory=FakeSpawner,
            key_loader=lambda path: KEY,
        )
        task = asyncio.create_task(controller.run())
        if before_ready is not None:
            await before_ready(controller)
        await asyncio.wait_for(controller.ready.wait(), 5)
        env = Env(controller, helper, runtime)
        try:
            yield env
        finally:
            controller.request_stop()
            await asyncio.wait_for(task, 10)
            env.close()
            await helper.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def test_up_status_restart_routes_and_clean_shutdown() -> None:
    async def body() -> None:
        async with running() as env:
            procs = env.spawner.live("office")
            assert sorted(p.queue for p in procs) == [0, 1]
            cfg0 = procs[0].config
            assert cfg0.bus_endpoint == f"ipc://{env.controller.bus_path}"
            assert cfg0.private_key == KEY and cfg0.network == "office"
            assert len(env.helper.networks) == 1
            assert oct(os.stat(env.runtime).st_mode & 0o777) == "0o711"
            assert oct(os.stat(env.controller.control_path).st_mode & 0o777) == "0o660"
            assert oct(os.stat(env.controller.bus_path).st_mode & 0o777) == "0o600"

            for p in procs:
                await env.say(p.pid, WorkerHello(network="office", queue=p.queue, pid=p.pid))
                await env.report(p.pid)
            await until(lambda: len(env.controller.networks["office"].reports) == 2)

            rc, out, err = await env.cli("status")
            assert rc == 0, err
            assert "network: office" in out and "state: up" in out and "20 packets" in out
            rc, out, _ = await env.cli("status", "--json")
            data = json.loads(out)
            net = data["networks"][0]
            assert net["state"] == "up" and net["counters"]["tun_rx_packets"] == 20
            assert net["drops"] == {"dgram_bad_header": 2}
            assert [q["pid"] for q in net["queues"]] == [p.pid for p in procs]
            assert [q["key_updates"] for q in net["queues"]] == [3, 3]
            assert [q["sessions"] for q in net["queues"]] == [2, 2]
            rc, out, _ = await env.cli("status", "-v")
            assert rc == 0 and out.count("key updates 3") == 2 and out.count("sessions 2,") == 2, out

            # peer routes: one allowed, one refused; then withdrawn
            await env.say(
                procs[0].pid,
                PeerRoutes(
                    network="office",
                    queue=0,
                    session=1,
                    epoch=1,
                    routes=("198.19.8.0/24", "10.0.0.0/8"),
                    tunnel_addresses=(),
                ),
            )
            await until(lambda: env.helper.networks["office"].routes == ["198.19.8.0/24"])
            add = [r for r in env.helper.requests if isinstance(r, AddRoutes)]
            assert add[-1].routes == ("198.19.8.0/24",)
            # stale epoch ignored
            await env.say(
                procs[0].pid,
                PeerRoutes(network="office", queue=0, session=1, epoch=0, routes=(), tunnel_addresses=()),
            )
            await env.say(
                procs[0].pid,
                PeerRoutes(network="office", queue=0, session=1, epoch=2, routes=(), tunnel_addresses=()),
            )
            await until(lambda: env.helper.networks["office"].routes == [])
            assert sum(isinstance(r, RemoveRoutes) for r in env.helper.requests) == 1

            # a crashed worker is restarted with a fresh ticket and counted
            crashed = procs[1]
            env.spawner.crash(crashed.pid, 1)
            await until(lambda: len(env.spawner.live("office")) == 2, timeout=RESTART_BACKOFF_MIN + 5)
            new = next(p for p in env.spawner.live("office") if p.queue == 1)
            assert new.pid != crashed.pid and new.config.ticket != crashed.config.ticket
            rc, out, _ = await env.cli("status", "--json")
            assert json.loads(out)["networks"][0]["restarts"] == 1

            # bad frames are counted, never fatal
            await env.worker(procs[0].pid).send(b"\x00garbage")
            await until(lambda: env.controller.bus is not None and env.controller.bus.bad_frames == 1)

            rc, out, err = await env.cli("down", "office")
            assert rc == 0, err
            assert env.spawner.live() == [] and env.helper.networks == {}
            rc, out, _ = await env.cli("status")
            assert "state: down" in out
            rc, out, err = await env.cli("up", "office")
            assert rc == 0, err
            assert len(env.spawner.live("office")) == 2
            rc, _, err = await env.cli("up", "nosuch")
            assert rc == cli.EXIT_FAILED and "no network 'nosuch'" in err
            spawner = env.spawner
        # after SIGTERM-equivalent stop: no worker left, the network stays in the helper (fail-closed)
        assert spawner.live() == []
        assert set(env.helper.networks) == {"office"}
        assert not os.path.exists(env.controller.control_path)

    run(body)


def test_reload_applies_only_the_difference_and_rejects_invalid(tmp_path: Any) -> None:
    async def body() -> None:
        path = str(tmp_path / "l3ptp.toml")
        async with running({"office": office(), "lab": lab()}, config_path=path) as env:
            before = {p.network: p.pid for p in env.spawner.live()}

            def write(text: str) -> None:
                with open(path, "w") as fh:
                    fh.write(text)

            write("this is = = not toml")
            rc, _, err = await env.cli("reload")
            assert rc == cli.EXIT_FAILED and "nothing changed" in err and "TOML syntax error" in err
            assert {p.network: p.pid for p in env.spawner.live()} == before

            # lab removed, office changed (mtu), new network added; written as TOML
            runtime = env.runtime
            write(
                f"""
[node]
id = "alpha"
key_file = "/etc/l3ptp/node.key"
[controller]
runtime_dir = "{runtime}"
helper_socket = "{runtime}/helper.sock"
[metrics]
enabled = false
[networks.office]
role = "listen"
mtu = 1200
local_ipv4 = "198.19.0.1/24"
peer_ipv4 = "198.19.0.2/24"
peer_key = "{office()["peer_key"]}"
underlay = {{ local = "198.18.0.1", port = 4433 }}
[networks.third]
role = "connect"
local_ipv4 = "198.19.3.1/24"
peer_ipv4 = "198.19.3.2/24"
peer_key = "{office()["peer_key"]}"
underlay = {{ peer = "198.18.0.9", port = 5000 }}
"""
            )
            rc, out, err = await env.cli("reload")
            assert rc == 0, err
            assert "added: third" in out and "removed: lab" in out and "changed: office" in out
            live = {p.network: p for p in env.spawner.live()}
            assert set(live) == {"office", "third"}
            assert live["office"].pid != before["office"] and live["office"].config.mtu == 1200
            assert set(env.helper.networks) == {"office", "third"}

            # reload again with the same file: nothing is touched
            pids = {p.pid for p in env.spawner.live()}
            rc, out, _ = await env.cli("reload")
            assert rc == 0 and "unchanged: office, third" in out
            assert {p.pid for p in env.spawner.live()} == pids

    run(body)


def test_reconcile_destroys_unknown_networks_and_adopts_known() -> None:
    """A restarted controller finds the helper's networks from its predecessor."""

    def spec(name: str, ifname: str, queues: int) -> CreateNetwork:
        return CreateNetwork(
            name=name,
            ifname=ifname,
            mtu=1280,
            addresses=("198.19.0.1/24",),
            queues=queues,
            worker_uid=os.getuid(),
            adopt=False,
            offload=True,  # the configuration's default, offload = "gro"
        )

    def prefill(helper: FakeHelper) -> None:
        helper.handle(spec("stale", "l3p-stale", 1))
        helper.handle(spec("office", "l3p-office", 2))
        helper.requests.clear()

    async def body() -> None:
        async with running(prefill=prefill) as env:
            assert set(env.helper.networks) == {"office"}
            destroyed = [r.name for r in env.helper.requests if isinstance(r, DestroyNetwork)]
            assert destroyed == ["stale"]
            creates = [r for r in env.helper.requests if isinstance(r, CreateNetwork)]
            assert creates and all(r.adopt for r in creates)
            assert len(env.spawner.live("office")) == 2

    run(body)


@pytest.mark.parametrize("changed", [{"offload": False}, {"queues": 1}, {"mtu": 1400}])
def test_a_network_kept_with_another_spec_is_recreated_at_start(changed: dict[str, Any]) -> None:
    """The configuration changed while the controller was stopped (offload, queues, a fixed MTU): the helper
    still has the network in its old form and refuses to adopt it as asked (EXISTS). The new controller
    re-creates it instead of leaving it down, as a reload changing these restarts it."""

    def prefill(helper: FakeHelper) -> None:
        fields = {"name": "office", "ifname": "l3p-office", "mtu": 1280, "addresses": ("198.19.0.1/24",),
                  "queues": 2, "worker_uid": os.getuid(), "adopt": False, "offload": True}
        helper.handle(CreateNetwork(**{**fields, **changed}))
        helper.requests.clear()

    async def body() -> None:
        async with running(prefill=prefill) as env:
            await until(lambda: len(env.spawner.live("office")) == 2)
            kinds = [(type(r).__name__, getattr(r, "adopt", None)) for r in env.helper.requests
                     if isinstance(r, (CreateNetwork, DestroyNetwork))]
            assert kinds == [("CreateNetwork", True), ("DestroyNetwork", None), ("CreateNetwork", True)]
            spec = env.helper.networks["office"].spec
            assert (spec.offload, spec.queues, spec.mtu) == (True, 2, 1280)
            net = env.controller.status(verbose=False).networks[0]
            assert net.state.value != "failed" and net.last_error == ""

    run(body)


def test_workers_of_the_previous_controller_are_adopted_not_respawned() -> None:
    """A restarted controller takes over the workers that outlived its predecessor (they report on the
    bus by themselves), spawns only the missing queues, keeps the helper's routes, and respawns an
    adopted worker that exits."""
    survivor_pid = 4242
    survivor: list[zmq.asyncio.Socket] = []
    ctx = zmq.asyncio.Context()

    def prefill(helper: FakeHelper) -> None:
        helper.handle(CreateNetwork(name="office", ifname="l3p-office", mtu=1280, addresses=("198.19.0.1/24",),
                                    queues=2, worker_uid=os.getuid(), adopt=False, offload=True))
        helper.handle(AddRoutes(name="office", routes=("198.19.8.0/24",), metric=100, allow_default=False))

    async def keep_reporting(controller: Controller) -> None:
        while controller.bus is None:
            await asyncio.sleep(0.01)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{controller.bus_path}")
        survivor.append(sock)
        await sock.send(BUS_UP.encode(WorkerHello(network="office", queue=0, pid=survivor_pid)))

    async def body() -> None:
        async with running(prefill=prefill, before_ready=keep_reporting, crashed=True) as env:
            rt = env.controller.networks["office"]
            assert rt.sup.slots[0].pid == survivor_pid and rt.sup.slots[0].state.name == "RUNNING"
            assert [p.queue for p in env.spawner.live("office")] == [1]  # queue 0 was not respawned
            assert {str(r) for r in rt.routes.installed} == {"198.19.8.0/24"}
            # The adopted worker is told the advertised routes (it then repeats the peer's routes).
            frames = await asyncio.wait_for(survivor[0].recv_multipart(), 5)
            assert isinstance(BUS_DOWN.decode_untrusted(frames[-1]), Advertise)
            env.controller._on_exit(survivor_pid, None)  # it exits: respawned after the back-off
            await until(lambda: [p.queue for p in env.spawner.live("office")] == [1, 0], timeout=5)
        survivor[0].close(linger=0)
        ctx.term()

    run(body)


def test_after_an_orderly_stop_nothing_is_awaited_for_adoption() -> None:
    """No bus socket and no handover marker left behind (a first start, or a stop that handed no worker
    over): none is waited for."""

    def prefill(helper: FakeHelper) -> None:
        helper.handle(CreateNetwork(name="office", ifname="l3p-office", mtu=1280, addresses=("198.19.0.1/24",),
                                    queues=2, worker_uid=os.getuid(), adopt=False, offload=True))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with running(prefill=prefill) as env:
            assert loop.time() - t0 < 2.0  # the adoption wait is 2.5 status intervals
            assert sorted(p.queue for p in env.spawner.live("office")) == [0, 1]

    run(body)


async def _status_forever(sock: zmq.asyncio.Socket, network: str, queue: int, pid: int) -> None:
    """What a running worker does: WorkerStatus every 0.1 s."""
    while True:
        await sock.send(BUS_UP.encode(WorkerStatus(
            network=network, queue=queue, pid=pid, state=SessionState.ESTABLISHED, peer="", rtt_ms=1.0, mtu=1280,
            counters={}, drops={}, queue_depth=0, seq_lost=0, sessions=1, key_updates=0, last_error="")))
        await asyncio.sleep(0.1)


async def _next_down(sock: zmq.asyncio.Socket, kind: type, timeout: float = 5.0) -> Any:
    """The next message of type `kind` the controller sends this worker (others skipped)."""
    async def first() -> Any:
        while True:
            msg = BUS_DOWN.decode_untrusted((await sock.recv_multipart())[-1])
            if isinstance(msg, kind):
                return msg
    return await asyncio.wait_for(first(), timeout)


def test_orderly_stop_hands_the_workers_over_and_the_next_controller_adopts_them() -> None:
    """SIGTERM-equivalent stop: every worker on the bus gets Handover(HANDOVER_GRACE) and is released,
    never signalled; the network stays in the helper; the marker is left. The next controller in the
    same runtime directory collects the survivors and adopts them instead of spawning."""

    async def body() -> None:
        async with running() as env:
            procs = sorted(env.spawner.live("office"), key=lambda p: p.queue)
            pids = [p.pid for p in procs]
            reporters = [asyncio.create_task(_status_forever(env.worker(p.pid), "office", p.queue, p.pid))
                         for p in procs]
            await until(lambda: len(env.controller.networks["office"].idents) == 2)
            first = env.spawner
            env.controller.request_stop()
            for p in procs:
                got = await _next_down(env.worker(p.pid), Handover)
                assert got.grace == HANDOVER_GRACE
            await until(lambda: env.controller.bus is None or env.controller.networks == {}, timeout=5)
            for p in procs:  # the Handover was the last word: no Heartbeat, no Shutdown after it
                with pytest.raises(TimeoutError):
                    await _next_down(env.worker(p.pid), object, timeout=1.5)
            assert first.released == set(pids)
            assert all(p.signals == [] and p.returncode is None for p in procs)
            assert set(env.helper.networks) == {"office"}
            marker = os.path.join(env.runtime, "handover")
            await until(lambda: os.path.exists(marker) and not os.path.exists(env.controller.control_path))

            nxt = Controller(make_config(env.runtime), spawner_factory=FakeSpawner, key_loader=lambda path: KEY)
            task = asyncio.create_task(nxt.run())
            try:
                await asyncio.wait_for(nxt.ready.wait(), 10)
                rt = nxt.networks["office"]
                assert [s.pid for s in rt.sup.slots] == pids
                assert [s.state.name for s in rt.sup.slots] == ["RUNNING", "RUNNING"]
                assert isinstance(nxt.spawner, FakeSpawner)
                assert nxt.spawner.live() == [] and set(nxt.spawner.adopted) == set(pids)  # none spawned
                assert not os.path.exists(marker)  # taken
                for p in procs:  # the next controller speaks to them (ends their grace)
                    await _next_down(env.worker(p.pid), Advertise)
                    assert (await _next_down(env.worker(p.pid), Rekey)).private_key == KEY  # the key it holds now
                assert nxt.status(verbose=False).networks[0].state.value != "failed"
                # It knows the key its adopted workers have: a reload of the same file changes nothing.
                result = await nxt.apply(make_config(env.runtime))
                assert result.ok and result.message == "unchanged: office", result.message
            finally:
                for r in reporters:
                    r.cancel()
                nxt.request_stop()
                await asyncio.wait_for(task, 10)

    run(body)


def test_a_late_survivor_is_adopted_into_a_free_queue_or_told_to_shut_down() -> None:
    """A worker this controller does not know reports after the adoption wait: for a queue whose
    worker runs it is told to Shutdown (once); for a queue waiting to restart it is adopted instead
    of the restart. The network never fails because of it."""

    async def body() -> None:
        async with running() as env:
            procs = sorted(env.spawner.live("office"), key=lambda p: p.queue)
            for p in procs:
                await env.say(p.pid, WorkerHello(network="office", queue=p.queue, pid=p.pid))
            rt = env.controller.networks["office"]
            await until(lambda: len(rt.idents) == 2)
            # queue 0 has a live worker: the stranger is told to go, twice reported, told once
            late0 = 5150
            await env.say(late0, WorkerHello(network="office", queue=0, pid=late0))
            got = await _next_down(env.worker(late0), Shutdown)
            assert "another worker" in got.reason
            await env.say(late0, WorkerHello(network="office", queue=0, pid=late0))
            await asyncio.sleep(0.3)
            assert rt.sup.slots[0].pid == procs[0].pid and late0 not in env.spawner.adopted
            # queue 1 waits to restart (its second crash: 0.5 s back-off): the late one takes it
            env.spawner.crash(procs[1].pid)
            await until(lambda: rt.sup.slots[1].pid not in (None, procs[1].pid))
            env.spawner.crash(rt.sup.slots[1].pid)
            await until(lambda: rt.sup.slots[1].state.name == "BACKOFF")
            # the exited worker's report, still queued: not a survivor (its pid may be reused)
            await env.say(procs[1].pid, WorkerHello(network="office", queue=1, pid=procs[1].pid))
            await asyncio.sleep(0.2)
            assert rt.sup.slots[1].state.name == "BACKOFF" and procs[1].pid not in env.spawner.adopted
            late1 = 5151
            await env.say(late1, WorkerHello(network="office", queue=1, pid=late1))
            await until(lambda: rt.sup.slots[1].pid == late1 and rt.sup.slots[1].state.name == "RUNNING")
            assert late1 in env.spawner.adopted
            await _next_down(env.worker(late1), Advertise)
            await asyncio.sleep(RESTART_BACKOFF_MIN + 0.3)
            assert rt.sup.slots[1].pid == late1  # the pending restart was cancelled
            assert not rt.sup.failed

    run(body)


def test_cli_errors_without_controller(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--runtime-dir", str(tmp_path), "status"], out=out, err=err)
    assert rc == cli.EXIT_UNREACHABLE and "not running" in err.getvalue()
    # a socket file nobody answers on: timeout message
    sock_path = tmp_path / "control.sock"
    sock_path.touch()
    err = io.StringIO()
    rc = cli.main(["--socket", str(sock_path), "--timeout", "0.2", "status"], out=out, err=err)
    assert rc == cli.EXIT_UNREACHABLE and "did not answer" in err.getvalue()


def test_cli_permission_denied(tmp_path: Any) -> None:
    """A caller who may not use the socket gets a clear error, not a silent hang."""
    sock_path = tmp_path / "control.sock"
    sock_path.touch()
    os.chmod(sock_path, 0o660)
    if os.geteuid() != 0:
        os.chmod(sock_path, 0o000)
        err = io.StringIO()
        rc = cli.main(["--socket", str(sock_path), "status"], out=io.StringIO(), err=err)
        assert rc == cli.EXIT_UNREACHABLE and "permission denied" in err.getvalue()
        return
    # As root: fork, become "nobody" (neither owner nor in the group) and run the real command.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            err = io.StringIO()
            code = cli.main(["--socket", str(sock_path), "status"], out=io.StringIO(), err=err)
            os.write(write_end, err.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        message = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == cli.EXIT_UNREACHABLE, message
    assert "permission denied" in message and "admin_group" in message


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["status", "--help"], ["up", "--help"], ["down", "--help"], ["reload", "--help"], ["keygen", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        assert "usage: l3ptp" in capsys.readouterr().out


def test_keygen_writes_a_private_key_and_prints_its_fingerprint(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    key = tmp_path / "node.key"
    assert cli.main(["keygen", "--out", str(key)], out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().startswith("SHA256:") and len(out.getvalue().strip()) == 50
    assert os.stat(key).st_mode & 0o777 == 0o600
    # never overwrites
    assert cli.main(["keygen", "--out", str(key)], out=io.StringIO(), err=err) == cli.EXIT_FAILED
    assert "exists" in err.getvalue()


def _routes_msg(queue: int, session: int, epoch: int, routes: tuple[str, ...]) -> PeerRoutes:
    return PeerRoutes(network="office", queue=queue, session=session, epoch=epoch, routes=routes, tunnel_addresses=())


def test_routes_reinstalled_when_the_helper_recreated_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted helper reconciled our network away; the next CreateNetwork (on a worker restart)
    builds it anew (adopted=False) and the routes the new session announces are installed again."""
    from l3ptp.controller import helper_link

    monkeypatch.setattr(helper_link, "HELPER_PROBE_INTERVAL", 3600.0)  # only the worker-restart path here

    async def body() -> None:
        async with running() as env:
            procs = env.spawner.live("office")
            for p in procs:
                await env.say(p.pid, WorkerHello(network="office", queue=p.queue, pid=p.pid))
            await env.say(procs[0].pid, _routes_msg(0, 1, 1, ("198.19.8.0/24",)))
            await until(lambda: env.helper.networks["office"].routes == ["198.19.8.0/24"])
            env.helper.networks.clear()  # what a restarted helper's reconcile leaves
            env.spawner.crash(procs[0].pid, 1)
            await until(lambda: any(p.queue == 0 and p.pid != procs[0].pid for p in env.spawner.live("office")),
                        timeout=RESTART_BACKOFF_MIN + 5)
            new = next(p for p in env.spawner.live("office") if p.queue == 0)
            assert "office" in env.helper.networks  # created anew
            await env.say(new.pid, WorkerHello(network="office", queue=0, pid=new.pid))
            await env.say(new.pid, _routes_msg(0, 1, 1, ("198.19.8.0/24",)))
            await until(lambda: env.helper.networks["office"].routes == ["198.19.8.0/24"])

    run(body)


def test_reload_of_advertised_routes_only_tells_the_workers(tmp_path: Any) -> None:
    """Only advertised_routes changed: no restart; every worker on the bus gets Advertise
    at once, and a worker that joins the bus later gets it on its first message."""
    async def body() -> None:
        nets = {"office": office(queues=2, advertised_routes=["198.19.10.0/24"])}
        async with running(nets) as env:
            procs = {p.queue: p for p in env.spawner.live("office")}
            assert procs[0].config.advertised_routes == ("198.19.10.0/24",)
            await env.report(procs[0].pid)  # queue 0 is on the bus, queue 1 not yet
            await asyncio.sleep(0.2)
            new = make_config(env.runtime, {"office": office(queues=2, advertised_routes=["198.19.11.0/24",
                                                                                          "198.19.12.0/24"])})
            result = await env.controller.apply(new)
            assert result.ok and "applied live: office" in result.message
            assert {p.pid for p in env.spawner.live("office")} == {procs[0].pid, procs[1].pid}

            async def advertise_to(pid: int) -> Advertise:
                while True:
                    msg = BUS_DOWN.decode_untrusted(await asyncio.wait_for(env.worker(pid).recv(), 5))
                    if isinstance(msg, Advertise):
                        return msg

            want = ("198.19.11.0/24", "198.19.12.0/24")
            got = await advertise_to(procs[0].pid)
            assert (got.network, got.queue, got.advertised_routes) == ("office", 0, want)
            assert "198.19.11.0/24" in got.local_sources and "198.19.0.1/32" not in got.advertised_routes
            await env.report(procs[1].pid)  # first message after the reload
            got = await advertise_to(procs[1].pid)
            assert (got.queue, got.advertised_routes) == (1, want)
            assert env.controller.networks["office"].net.advertised_routes == new.network("office").advertised_routes

    asyncio.run(body())


def test_exits_from_network_input_never_fail_the_network_and_status_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that ends again and again because of what the network sent it
    (WorkerExiting.remote) is restarted each time, more than the crash limit,
    and the network never becomes `failed`; `l3ptp status` shows the reason the
    worker gave (escaped: it may quote a peer), not just "exited with status 0",
    and `status --json` stays valid JSON with the same escaped text."""
    from l3ptp.controller import supervision
    from l3ptp.ipc.constants import RESTART_MAX_IN_WINDOW
    from l3ptp.ipc.control_messages import WorkerExiting

    monkeypatch.setattr(supervision, "RESTART_BACKOFF_MIN", 0.02)
    reason = "internal error in _on_udp_readable: boom \x1b]0;owned\x07\x1b[2J\r"
    shown = "internal error in _on_udp_readable: boom \\x1b]0;owned\\x07\\x1b[2J\\x0d (exit status 0)"

    async def body() -> None:
        async with running({"office": office(queues=1)}) as env:
            rt = env.controller.networks["office"]
            for _ in range(RESTART_MAX_IN_WINDOW + 2):
                (proc,) = env.spawner.live("office")
                await env.say(proc.pid, WorkerHello(network="office", queue=0, pid=proc.pid))
                await env.say(proc.pid, WorkerExiting(network="office", queue=0, reason=reason, fatal=False,
                                                      remote=True))
                await until(lambda: rt.sup.slots[0].exit_reason == reason)
                env.spawner.crash(proc.pid, 0)
                await until(lambda: rt.sup.slots[0].pid not in (None, proc.pid) or rt.sup.failed)
                assert not rt.sup.failed, rt.sup.failed_reason
            rc, out, err = await env.cli("status", "-v")
            assert rc == 0, err
            assert "state: failed" not in out and f"last error: {shown}" in out, out
            assert "\x1b" not in out and "\x07" not in out and "\r" not in out
            rc, out, _ = await env.cli("status", "--json")
            net = json.loads(out)["networks"][0]
            assert net["state"] != "failed" and net["restarts"] == RESTART_MAX_IN_WINDOW + 2
            assert net["queues"][0]["last_error"] == shown

    run(body)


def test_a_local_crash_reason_survives_into_status() -> None:
    from l3ptp.ipc.control_messages import WorkerExiting

    async def body() -> None:
        async with running({"office": office(queues=1)}) as env:
            rt = env.controller.networks["office"]
            (proc,) = env.spawner.live("office")
            await env.say(proc.pid, WorkerHello(network="office", queue=0, pid=proc.pid))
            await env.say(proc.pid, WorkerExiting(network="office", queue=0, reason="TUN queue unusable: end of file",
                                                  fatal=False, remote=False))
            await until(lambda: rt.sup.slots[0].exit_reason != "")
            env.spawner.crash(proc.pid, 0)
            await until(lambda: rt.sup.slots[0].pid != proc.pid)
            rc, out, _ = await env.cli("status")
            assert "last error: TUN queue unusable: end of file (exit status 0)" in out, out
            assert len(rt.sup.slots[0].crashes) == 1

    run(body)


def test_peer_routes_over_every_queue_never_stop_the_controller() -> None:
    """Two queues whose peer advertises 256 distinct accepted routes each: the
    union would be 512, more than one helper request carries (the first
    request is refused, as a helper policy with a lower max_routes would, so
    nothing is installed when the second queue's routes come). The controller
    asks for 256, refuses the rest with a reason and keeps serving."""
    from l3ptp.ipc.errors import ErrorCode
    from l3ptp.ipc.helper_messages import AddRoutes as AddRoutesReq

    prefixes = [f"198.19.{64 + i // 16}.{i % 16 * 16}/28" for i in range(512)]

    async def body() -> None:
        async with running({"office": office(queues=2, accepted_routes=["198.19.64.0/18"])}) as env:
            env.helper.fail_next[AddRoutesReq] = (ErrorCode.LIMIT, "at most 100 routes per network")
            procs = env.spawner.live("office")
            for p in procs:
                await env.say(p.pid, WorkerHello(network="office", queue=p.queue, pid=p.pid))
            for p in procs:
                await env.say(p.pid, PeerRoutes(network="office", queue=p.queue, session=1, epoch=1,
                                                routes=tuple(prefixes[p.queue * 256:(p.queue + 1) * 256]),
                                                tunnel_addresses=()))
            await until(lambda: len(env.helper.networks["office"].routes) == 256)
            await asyncio.sleep(0.2)
            assert not env.controller._stop.is_set()
            rc, out, err = await env.cli("status", "--json")
            assert rc == 0, err
            assert len(json.loads(out)["networks"][0]["routes"]) == 256

    run(body)


def test_a_bus_message_that_fails_to_apply_does_not_stop_the_controller() -> None:
    async def body() -> None:
        async with running({"office": office(queues=1)}) as env:
            (proc,) = env.spawner.live("office")
            await env.say(proc.pid, WorkerHello(network="office", queue=0, pid=proc.pid))

            async def broken(_rt: Any) -> None:
                raise RuntimeError("a bug while applying routes")

            env.controller.lifecycle.apply_routes = broken  # type: ignore[method-assign]
            await env.say(proc.pid, PeerRoutes(network="office", queue=0, session=1, epoch=1,
                                               routes=("198.19.8.0/24",), tunnel_addresses=()))
            await env.report(proc.pid)
            await until(lambda: 0 in env.controller.networks["office"].reports)
            assert not env.controller._stop.is_set()
            rc, out, err = await env.cli("status")
            assert rc == 0 and "network: office" in out, err

    run(body)


def test_a_restarted_listener_worker_is_told_the_peer_its_predecessor_reported() -> None:
    """Issue 13: the new worker of a listen network sends RESTART_HINT to that address at start (the
    connector reconnects at once instead of at its next packet); a connect network's worker gets none."""
    async def body() -> None:
        async with running({"office": office(), "lab": lab()}) as env:
            procs = {p.network: p for p in env.spawner.live() if p.queue == 0}
            assert all(p.config.last_peer is None and p.config.last_peer_port == 0 for p in procs.values())
            for p in procs.values():
                await env.say(p.pid, WorkerHello(network=p.network, queue=0, pid=p.pid))
                await env.report(p.pid)  # peer "198.18.0.2:4433"
            await until(lambda: all(0 in env.controller.networks[n].reports for n in procs))
            for p in procs.values():
                env.spawner.crash(p.pid, -9)
            await until(lambda: {n for n in procs if any(q.queue == 0 and q.pid != procs[n].pid
                                                         for q in env.spawner.live(n))} == set(procs))
            new = {n: next(q for q in env.spawner.live(n) if q.queue == 0) for n in procs}
            assert (new["office"].config.last_peer, new["office"].config.last_peer_port) == ("198.18.0.2", 4433)
            assert (new["lab"].config.last_peer, new["lab"].config.last_peer_port) == (None, 0)

    run(body)
