from __future__ import annotations

import itertools

import pytest

from l3ptp.helper.state import HelperState, Network
from l3ptp.helper.policy import PolicyRefused
from l3ptp.ipc.errors import ErrorCode


def _state() -> HelperState:
    counter = itertools.count()
    return HelperState(ticket_ttl=30.0, token=lambda: f"t{next(counter)}")


def _net(queues: int = 2, uid: int = 1001) -> Network:
    return Network(name="n", ifname="l3p-n", ifindex=5, mtu=1280, addresses=(), queues=queues, worker_uid=uid,
                   fds=[100 + q for q in range(queues)])


def _issued() -> tuple[HelperState, Network, tuple[str, ...]]:
    """A state holding one network (`_net()`) whose tickets were issued at time 0."""
    s = _state()
    net = _net()
    s.add(net)
    return s, net, s.issue(net, now=0.0)


def _refusal(s: HelperState, ticket: str, uid: int, now: float) -> ErrorCode:
    """The code `claim` refuses with (it must refuse)."""
    with pytest.raises(PolicyRefused) as info:
        s.claim(ticket, uid, now=now)
    return info.value.code


def test_one_ticket_per_queue_single_use() -> None:
    s, net, tickets = _issued()
    assert tickets == ("t0", "t1")
    assert s.claim("t1", 1001, now=1.0) == (net, 1)
    assert _refusal(s, "t1", 1001, now=1.0) is ErrorCode.NOT_FOUND
    assert s.claim("t0", 1001, now=29.9) == (net, 0)


def test_ticket_expires() -> None:
    s, _, _ = _issued()
    assert _refusal(s, "t0", 1001, now=30.0) is ErrorCode.EXPIRED
    assert _refusal(s, "t0", 1001, now=30.0) is ErrorCode.NOT_FOUND


def test_ticket_bound_to_uid_and_not_consumed_by_wrong_uid() -> None:
    s, net, _ = _issued()
    assert _refusal(s, "t0", 65534, now=1.0) is ErrorCode.NOT_PERMITTED
    assert s.claim("t0", 1001, now=1.0) == (net, 0)


def test_reissue_revokes_and_forget_drops_tickets() -> None:
    s, net, _ = _issued()
    assert s.issue(net, now=1.0) == ("t2", "t3")
    assert set(s.tickets) == {"t2", "t3"}
    assert s.by_ifname("l3p-n") is net
    assert s.forget("n") is net
    assert s.tickets == {} and s.networks == {}


def test_spec_ignores_address_order() -> None:
    a = _net()
    b = _net()
    a.addresses, b.addresses = ("198.19.0.1/24", "fd00::1/64"), ("fd00::1/64", "198.19.0.1/24")
    assert a.spec() == b.spec()
