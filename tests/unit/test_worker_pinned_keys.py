"""Issue 18: several pinned peer keys (`peer_keys`, each with an optional not-after time): a session
accepts a peer proving any of the keys valid now, records which, and none past its time; the
configuration reads and checks them and the worker gets them."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from l3ptp.controller.config import ConfigError, parse_config
from l3ptp.controller.worker_config import build_worker_config
from l3ptp.ipc.types import PeerRole
from l3ptp.worker.connections import pinned_now
from l3ptp.worker.session import State
from tests.support.config_builders import KEY_A, KEY_B, KEY_C, config, office
from tests.support.worker_fixtures import make_config, new_keys
from tests.unit.test_worker_session import _keys, _params, _run, _session

NOW = 1_800_000_000.0


def pair(listener_pinned: frozenset[str] | None, connector_pinned: frozenset[str] | None, *, ckey=None, lkey=None):  # type: ignore[no-untyped-def]
    lraw, lfp = lkey or _keys()
    craw, cfp = ckey or _keys()
    lp = dataclasses.replace(_params(PeerRole.LISTEN, lraw, "SHA256:unused"), pinned=listener_pinned)
    cp = dataclasses.replace(_params(PeerRole.CONNECT, craw, "SHA256:unused"), pinned=connector_pinned)
    return _session(lp, ctx=111), _session(cp, ctx=222), lfp, cfp


def test_a_listener_pinning_two_keys_takes_a_connector_with_either_and_says_which() -> None:
    old, new = _keys(), _keys()
    lkey = _keys()
    for ckey in (old, new):
        listener, connector, lfp, cfp = pair(frozenset({old[1], new[1]}), frozenset({lkey[1]}), ckey=ckey, lkey=lkey)
        _run(listener, connector, lfp)
        assert listener.state is State.ESTABLISHED and connector.state is State.ESTABLISHED
        assert listener.peer_fingerprint == ckey[1] and connector.peer_fingerprint == lkey[1]


def test_a_connector_pinning_two_listener_keys_takes_either() -> None:
    l_old, l_new = _keys(), _keys()
    for lkey in (l_old, l_new):
        ckey = _keys()
        listener, connector, lfp, _ = pair(frozenset({ckey[1]}), frozenset({l_old[1], l_new[1]}), ckey=ckey, lkey=lkey)
        _run(listener, connector, lfp)
        assert connector.state is State.ESTABLISHED and connector.peer_fingerprint == lfp


def test_a_key_not_in_the_set_and_an_empty_set_are_refused() -> None:
    listener, connector, lfp, _ = pair(frozenset({_keys()[1]}), None)
    connector = _session(dataclasses.replace(connector.params, peer_key=lfp))
    _run(listener, connector, lfp)
    assert listener.state is State.CLOSED and listener.peer_fingerprint == ""
    listener, connector, lfp, cfp = pair(frozenset(), None)  # every pinned key past its time
    connector = _session(dataclasses.replace(connector.params, peer_key=lfp))
    _run(listener, connector, lfp)
    assert listener.state is State.CLOSED


def test_the_worker_accepts_the_keys_not_past_their_time() -> None:
    k = new_keys()
    cfg = make_config(PeerRole.LISTEN, own=k, peer_fp=KEY_A, port=4433, peer_keys=(KEY_A, KEY_B, KEY_C),
                      peer_keys_not_after=(0.0, NOW + 10, NOW - 10))
    assert pinned_now(cfg, NOW) == {KEY_A, KEY_B}
    assert pinned_now(cfg, NOW + 11) == {KEY_A}
    only = make_config(PeerRole.LISTEN, own=k, peer_fp=KEY_A, port=4433)
    assert pinned_now(only, NOW) == {KEY_A}  # without peer_keys: peer_key alone
    expired = make_config(PeerRole.LISTEN, own=k, peer_fp=KEY_A, port=4433, peer_keys=(KEY_A,),
                          peer_keys_not_after=(NOW - 1,))
    assert pinned_now(expired, NOW) == frozenset()  # nobody, not the peer_key fallback


def net_with(**kw: Any) -> Any:
    return parse_config(config({"n": office(**kw)})).networks[0]


def test_the_configuration_reads_peer_keys_with_not_after_times() -> None:
    when = datetime.datetime(2027, 1, 31, tzinfo=datetime.timezone.utc)
    net = net_with(peer_key=KEY_A, peer_keys=[KEY_B, {"key": KEY_C, "not_after": when}])
    assert net.peer_key == KEY_A and net.peer_keys == ((KEY_A, 0.0), (KEY_B, 0.0), (KEY_C, when.timestamp()))
    only = {k: v for k, v in office().items() if k != "peer_key"}
    net = parse_config(config({"n": {**only, "peer_keys": [KEY_C, KEY_B]}})).networks[0]
    assert net.peer_key == KEY_C and [k for k, _ in net.peer_keys] == [KEY_C, KEY_B]
    cfg = parse_config(config({"n": {**only, "peer_keys": [KEY_C, {"key": KEY_B, "not_after": when}]}}))
    w = build_worker_config(cfg, cfg.networks[0], 0, "t" * 32, bus_path="/run/x.sock", key_loader=lambda p: bytes(32))
    assert w.peer_keys == (KEY_C, KEY_B) and w.peer_keys_not_after == (0.0, when.timestamp())


@pytest.mark.parametrize("value, fragment", [
    ([], "a non-empty list"),
    (["SHA256:short"], "must be 'SHA256:'"),
    ([KEY_A, KEY_A], "twice"),
    ([{"key": KEY_A, "not_after": "2027-01-31"}], "date-time with an offset"),
    ([{"key": KEY_A, "not_after": datetime.datetime(2027, 1, 31)}], "date-time with an offset"),
    ([{"fingerprint": KEY_A}], "needs `key`"),
    ([KEY_A] * 9, "at most 8"),
])
def test_bad_peer_keys_are_refused_with_a_reason(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        net_with(peer_keys=value)
    assert any("networks.n.peer_keys" in e and fragment in e for e in info.value.errors), info.value.errors


def test_neither_peer_key_nor_peer_keys_is_an_error() -> None:
    only = {k: v for k, v in office().items() if k != "peer_key"}
    with pytest.raises(ConfigError, match="peer_key: required"):
        parse_config(config({"n": only}))


@pytest.mark.parametrize(("offload", "tso"), [("auto", True), ("gro", False), ("off", True)])
def test_the_worker_asks_for_tso_only_with_offload_auto(offload: str, tso: bool) -> None:
    """`offload = "gro"`: the helper makes the same IFF_VNET_HDR device, the worker asks the kernel for no TSO."""
    cfg = parse_config(config({"n": office(offload=offload)}))
    w = build_worker_config(cfg, cfg.networks[0], 0, "t" * 32, bus_path="/run/x.sock", key_loader=lambda p: bytes(32))
    assert w.tso is tso
