"""worker.helper_client against the real helper server loop (fake kernel, no root)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from l3ptp.helper.dispatch import Dispatcher
from l3ptp.helper.server import Server, open_listener
from l3ptp.helper.state import HelperState
from l3ptp.ipc.helper_messages import CreateNetwork, NetworkCreated, Role
from l3ptp.worker.helper_client import HelperError, WorkerHelperClient
from tests.support.helper_fixtures import Client, FakeClock, FakeKernel, make_policy

pytestmark = pytest.mark.timeout(60)
UID = os.getuid()


@pytest.fixture
def helper(tmp_path):
    kernel = FakeKernel()
    dispatcher = Dispatcher(make_policy(controller_uids=[UID], worker_uids=[UID]), HelperState(), kernel,
                            lambda action, **f: None, FakeClock())
    path = str(tmp_path / "helper.sock")
    server = Server(dispatcher, open_listener(path, None))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.step(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path, kernel, dispatcher
    finally:
        stop.set()
        thread.join(5)
        server.close()
        kernel.close()


def _tickets(path: str) -> tuple[str, ...]:
    c = Client.connect(path)
    try:
        c.hello(Role.CONTROLLER)
        reply, _ = c.request(CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=("198.19.1.1/24",),
                                           queues=1, worker_uid=UID, adopt=False))
        assert isinstance(reply, NetworkCreated)
        return reply.tickets
    finally:
        c.close()


def test_claim_queue_and_protect_socket(helper) -> None:
    path, kernel, dispatcher = helper
    (ticket,) = _tickets(path)
    client = WorkerHelperClient(path)
    try:
        grant, fd = client.claim_queue(ticket)
        assert grant.queue == 0 and grant.ifname == "l3p-n1"
        net = dispatcher.state.networks["n1"]
        kernel.peer_of(net.fds[0]).send(b"from the kernel")
        assert os.read(fd, 100) == b"from the kernel"
        os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            client.protect_socket(udp)
        assert len(kernel.protected) == 1
    finally:
        client.close()


def test_reused_ticket_is_refused(helper) -> None:
    path, _, _ = helper
    (ticket,) = _tickets(path)
    first = WorkerHelperClient(path)
    _, fd = first.claim_queue(ticket)
    os.close(fd)
    first.close()
    second = WorkerHelperClient(path)
    try:
        with pytest.raises(HelperError):
            second.claim_queue(ticket)
    finally:
        second.close()
