"""HelperClient against the fake helper over a real SOCK_SEQPACKET socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from l3ptp.controller.helper_client import HelperClient, HelperFailed, HelperUnavailable
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.helper_messages import (
    HELPER_REPLIES,
    CreateNetwork,
    DestroyNetwork,
    Hello,
    ListNetworks,
    NetworkCreated,
    NetworkDestroyed,
    NetworkList,
)
from tests.support.fake_helper import FakeHelper

T = TypeVar("T")


def run(body: Callable[[FakeHelper], Awaitable[T]]) -> T:
    async def main() -> T:
        helper = FakeHelper(uid=4242)
        try:
            return await asyncio.wait_for(body(helper), 10)
        finally:
            await helper.close()

    return asyncio.run(main())


async def connected(helper: FakeHelper, timeout: float = 2.0) -> HelperClient:
    client = HelperClient(helper.socketpair(), timeout=timeout)
    await client.hello()
    return client


async def create(client: HelperClient, name: str = "office", queues: int = 2, adopt: bool = False):  # type: ignore[no-untyped-def]
    return (await client.create_network(
        name=name,
        ifname=f"l3p-{name}",
        mtu=1280,
        addresses=["198.19.0.1/24"],
        queues=queues,
        worker_uid=1000,
        adopt=adopt,
    ))[0]


def test_hello_create_routes_list_destroy() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        assert client.uid == 4242
        created = await create(client)
        assert created.name == "office" and len(created.tickets) == 2 and not created.adopted
        changed = await client.add_routes("office", ["198.19.8.0/24"], metric=100, allow_default=False)
        assert changed.routes == ("198.19.8.0/24",)
        changed = await client.remove_routes("office", ["198.19.8.0/24"])
        assert changed.routes == ()
        (info,) = await client.list_networks()
        assert info.name == "office" and info.queues == 2
        assert isinstance(await client.destroy_network("office"), NetworkDestroyed)
        assert await client.list_networks() == ()
        assert isinstance(helper.requests[0], Hello)
        client.close()
        assert client.closed

    run(body)


def test_list_networks_reads_every_page() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        names = [f"n{i:02d}" for i in range(11)]
        for name in reversed(names):
            await create(client, name, queues=1)
        assert [info.name for info in await client.list_networks()] == names
        pages = [r for r in helper.requests if isinstance(r, ListNetworks)]
        assert [p.after for p in pages] == [None, "n03", "n07"]  # 4 a page
        client.close()

    run(body)


def test_list_networks_pages_that_do_not_advance_are_refused() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        await create(client, "a", queues=1)
        helper.raw_next = HELPER_REPLIES.encode(NetworkList(networks=(), more=True))
        with pytest.raises(HelperUnavailable, match="out of order"):
            await client.list_networks()
        assert client.closed

    run(body)


def test_failed_reply_raises_typed_error_and_connection_stays_usable() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        await create(client)
        with pytest.raises(HelperFailed) as info:
            await create(client)
        assert info.value.code is ErrorCode.EXISTS
        helper.fail_next[DestroyNetwork] = (ErrorCode.OUT_OF_POLICY, "nope")
        with pytest.raises(HelperFailed) as info2:
            await client.destroy_network("office")
        assert info2.value.code is ErrorCode.OUT_OF_POLICY and info2.value.reason == "nope"
        assert not client.closed
        adopted = await create(client, adopt=True)
        assert adopted.adopted
        client.close()

    run(body)


def test_garbage_reply_closes_the_connection() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        helper.raw_next = b"\xc1not msgpack"
        with pytest.raises(HelperUnavailable, match="bad reply"):
            await client.list_networks()
        assert client.closed
        with pytest.raises(HelperUnavailable, match="not connected"):
            await client.list_networks()

    run(body)


def test_unexpected_reply_type_closes_the_connection() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper)
        with pytest.raises(HelperUnavailable, match="ListNetworks with NetworkList, expected NetworkCreated"):
            await client.request_expect(ListNetworks(), NetworkCreated)
        assert client.closed

    run(body)


def test_silent_helper_times_out() -> None:
    async def body(helper: FakeHelper) -> None:
        client = await connected(helper, timeout=0.2)
        helper.mute = True
        with pytest.raises(HelperUnavailable, match="TimeoutError"):
            await client.list_networks()
        assert client.closed

    run(body)


def test_helper_closing_is_unavailable() -> None:
    async def body(helper: FakeHelper) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.close()
        client = HelperClient(a, timeout=1.0)
        with pytest.raises(HelperUnavailable):
            await client.hello()

    run(body)


def test_connect_by_path_and_missing_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")

    async def body(helper: FakeHelper) -> None:
        with pytest.raises(HelperUnavailable, match="cannot connect"):
            await HelperClient.connect(path, timeout=1.0)
        await helper.serve_path(path)
        client = await HelperClient.connect(path, timeout=1.0)
        assert client.uid == 4242
        await create(client)
        assert isinstance(helper.requests[-1], CreateNetwork)
        client.close()

    run(body)
