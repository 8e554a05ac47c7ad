"""The control session state machine, in memory (no sockets, no QUIC)."""

from __future__ import annotations

import pytest

from l3ptp.ipc.counters import Counters
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.constants import AUTH_FAILED_REASON, PROTOCOL_VERSION
from l3ptp.ipc.peer_messages import Auth, Challenge, Close, Hello, Keepalive, Ready, Renew, RouteUpdate
from l3ptp.ipc.types import PeerRole
from l3ptp.worker import keys
from l3ptp.worker.session import (
    TRANSITIONS,
    Closed,
    Established,
    RoutesChanged,
    Send,
    Session,
    SessionParams,
    State,
    accepted_mtu,
)

KA = 1.0
PAYLOAD = 1318  # DATAGRAM budget for max_datagram_size 1350 and 8-byte CIDs


def _keys():
    k = keys.generate_private_key()
    return keys.private_key_raw(k), keys.fingerprint(k)


def _params(role, own, peer_fp, *, mtu=1280, network="net0", endpoint=0, routes=()):
    host = 1 if role is PeerRole.LISTEN else 2
    return SessionParams(
        role=role,
        network_id=network,
        endpoint_id=endpoint,
        node_id=role.value,
        private_key=own,
        peer_key=peer_fp,
        requested_mtu=mtu,
        keepalive_interval=KA,
        tunnel_addresses=(f"198.19.0.{host}/24",),
        local_sources=(f"198.19.0.{host}/32",),
        advertised_routes=routes,
    )


def _session(params, nonce=b"\x07" * 32, ctx=1000):
    return Session(params, Counters(), now=0.0, nonce=nonce, rx_context_id=ctx)


def _pair(**kw):
    lraw, lfp = _keys()
    craw, cfp = _keys()
    listener = _session(_params(PeerRole.LISTEN, lraw, kw.pop("listener_pin", cfp), **kw), ctx=111)
    connector = _session(_params(PeerRole.CONNECT, craw, kw.pop("connector_pin", lfp)), ctx=222)
    return listener, connector, lfp, cfp


def _sends(actions):
    return [a.message for a in actions if isinstance(a, Send)]


def _run(listener, connector, listener_cert_fp):
    """Drive both sessions until quiet; return all actions per side."""
    all_l, all_c = [], []
    all_l += listener.handshake_completed(0.0, None, PAYLOAD)
    out = connector.handshake_completed(0.0, listener_cert_fp, PAYLOAD)
    all_c += out
    to_l, to_c = _sends(out), []
    while to_l or to_c:
        nxt_l, nxt_c = [], []
        for m in to_l:
            acts = listener.receive(m, 0.1)
            all_l += acts
            nxt_c += _sends(acts)
        for m in to_c:
            acts = connector.receive(m, 0.1)
            all_c += acts
            nxt_l += _sends(acts)
        to_l, to_c = nxt_l, nxt_c
    return all_l, all_c


def test_happy_path_message_order_and_context_ids() -> None:
    listener, connector, lfp, _ = _pair()
    all_l, all_c = _run(listener, connector, lfp)
    assert [type(m).__name__ for m in _sends(all_c)] == ["Hello", "Auth", "Ready"]
    # The listener's HELLO only after the connector's AUTH (protocol version 2).
    assert [type(m).__name__ for m in _sends(all_l)] == ["Challenge", "Hello", "Ready"]
    assert all(m.auth_nonce == b"" and m.protocol_version == PROTOCOL_VERSION == 2
               for m in _sends(all_l + all_c) if isinstance(m, Hello))
    assert listener.state is State.ESTABLISHED and connector.state is State.ESTABLISHED
    est_l = next(a for a in all_l if isinstance(a, Established))
    est_c = next(a for a in all_c if isinstance(a, Established))
    assert (est_l.tx_context_id, est_l.rx_context_id) == (222, 111)
    assert (est_c.tx_context_id, est_c.rx_context_id) == (111, 222)
    assert est_l.mtu == est_c.mtu == 1280
    assert any(isinstance(a, RoutesChanged) for a in all_l)


def test_mtu_is_min_of_requests_and_budgets() -> None:
    assert accepted_mtu(1400, 1350, 1500, 1318) == 1302
    assert accepted_mtu(1400, 1300, 1500, 1318) == 1300
    assert accepted_mtu(1280, 1400, 2000, 2000) == 1280
    listener, connector, lfp, _ = _pair(mtu=1000)
    _run(listener, connector, lfp)
    assert listener.mtu == connector.mtu == 1000


def test_wrong_listener_key_rejected_by_connector() -> None:
    other_raw, other_fp = _keys()
    listener, connector, lfp, _ = _pair()
    actions = connector.handshake_completed(0.0, other_fp, PAYLOAD)
    assert actions[-1] == Closed(ErrorCode.AUTH_FAILED, actions[-1].reason, local=True, peer_reason=AUTH_FAILED_REASON)
    assert connector.state is State.CLOSED
    assert not any(isinstance(m, (Hello, Auth, Ready)) for m in _sends(actions))


def test_wrong_connector_key_rejected_by_listener() -> None:
    _, stranger_fp = _keys()
    listener, connector, lfp, _ = _pair(listener_pin=stranger_fp)
    all_l, all_c = _run(listener, connector, lfp)
    assert listener.state is State.CLOSED and listener.close_code is ErrorCode.AUTH_FAILED
    assert not any(isinstance(a, Established) for a in all_l + all_c)
    assert connector.state is State.CLOSED and connector.close_code is ErrorCode.AUTH_FAILED


def test_replayed_auth_from_another_session_rejected() -> None:
    lraw, lfp = _keys()
    craw, cfp = _keys()
    # Session 1: record the connector's AUTH.
    l1 = _session(_params(PeerRole.LISTEN, lraw, cfp), nonce=b"\x01" * 32)
    c1 = _session(_params(PeerRole.CONNECT, craw, lfp))
    _, all_c = _run(l1, c1, lfp)
    recorded = next(m for m in _sends(all_c) if isinstance(m, Auth))
    # Session 2: an attacker without the key replays HELLO + recorded AUTH.
    l2 = _session(_params(PeerRole.LISTEN, lraw, cfp), nonce=b"\x02" * 32)
    l2.handshake_completed(0.0, None, PAYLOAD)
    hello = next(m for m in _sends(all_c) if isinstance(m, Hello))
    l2.receive(hello, 0.1)
    actions = l2.receive(recorded, 0.2)
    assert l2.state is State.CLOSED and l2.close_code is ErrorCode.AUTH_FAILED
    assert isinstance(_sends(actions)[0], Close)


@pytest.mark.parametrize(
    "role,state,msg_name",
    [
        (PeerRole.LISTEN, State.AWAIT_HELLO, "ready"),
        (PeerRole.LISTEN, State.AWAIT_HELLO, "auth"),
        (PeerRole.LISTEN, State.AWAIT_HELLO, "keepalive"),
        (PeerRole.LISTEN, State.AWAIT_HELLO, "challenge"),
        (PeerRole.CONNECT, State.AWAIT_CHALLENGE, "ready"),
        (PeerRole.CONNECT, State.AWAIT_CHALLENGE, "route_update"),
        (PeerRole.CONNECT, State.AWAIT_CHALLENGE, "auth"),
        (PeerRole.CONNECT, State.AWAIT_CHALLENGE, "hello"),
    ],
)
def test_illegal_message_closes_with_protocol_violation(role, state, msg_name) -> None:
    raw, _ = _keys()
    _, peer_fp = _keys()
    s = _session(_params(role, raw, peer_fp))
    s.handshake_completed(0.0, peer_fp, PAYLOAD)
    assert s.state is state
    msg = {
        "ready": Ready(accepted_mtu=1280, peer_tunnel_addresses=(), peer_allowed_sources=(),
                       peer_advertised_routes=(), datagram_context_id=1, route_epoch=1),
        "auth": Auth(public_key=b"\0" * 32, signature=b"\0" * 64),
        "keepalive": Keepalive(monotonic_time=1.0, rx_packets=0, tx_packets=0, drop_counters={}),
        "route_update": RouteUpdate(add_routes=(), remove_routes=(), route_epoch=2),
        "challenge": Challenge(auth_nonce=b"\1" * 32),
        "hello": _hello_from(_params(PeerRole.LISTEN, raw, peer_fp)),
    }[msg_name]
    assert (role, state, type(msg)) not in TRANSITIONS
    actions = s.receive(msg, 0.1)
    assert s.state is State.CLOSED and s.close_code is ErrorCode.PROTOCOL_VIOLATION
    close = _sends(actions)[0]
    assert isinstance(close, Close) and close.code == ErrorCode.PROTOCOL_VIOLATION


def test_hello_again_after_established_is_a_violation() -> None:
    listener, connector, lfp, _ = _pair()
    _, all_c = _run(listener, connector, lfp)
    hello = next(m for m in _sends(all_c) if isinstance(m, Hello))
    listener.receive(hello, 1.0)
    assert listener.close_code is ErrorCode.PROTOCOL_VIOLATION


def _hello_from(params, *, version=PROTOCOL_VERSION, nonce=b""):
    return Hello(protocol_version=version, network_id=params.network_id, endpoint_id=params.endpoint_id,
                 node_id=params.node_id, supported_features=(), max_datagram_payload=PAYLOAD,
                 requested_mtu=params.requested_mtu, supported_address_families=(4,), auth_nonce=nonce)


def test_version_1_hello_refused_with_version_mismatch_before_anything_is_told() -> None:
    listener, _, _, _ = _pair()
    listener.handshake_completed(0.0, None, PAYLOAD)
    actions = listener.receive(_hello_from(listener.params, version=1, nonce=b""), 0.1)
    assert listener.close_code is ErrorCode.VERSION_MISMATCH
    assert [type(m) for m in _sends(actions)] == [Close]


def _bad_signature(auth: Auth) -> Auth:
    return Auth(public_key=auth.public_key, signature=bytes([auth.signature[0] ^ 1]) + auth.signature[1:])


@pytest.mark.parametrize("failure", ["network", "endpoint", "unpinned key", "bad signature"])
def test_listener_tells_a_stranger_nothing_and_every_auth_failure_looks_the_same(failure) -> None:
    """Before a good AUTH the listener sends CHALLENGE (a nonce) and, on any
    failure, CLOSE(AUTH_FAILED, AUTH_FAILED_REASON): never its HELLO (node id,
    network, MTU, budget), never which check failed."""
    lraw, lfp = _keys()
    craw, cfp = _keys()
    _, stranger_fp = _keys()
    listener = _session(_params(PeerRole.LISTEN, lraw, stranger_fp if failure == "unpinned key" else cfp), ctx=111)
    cparams = _params(PeerRole.CONNECT, craw, lfp, network="other" if failure == "network" else "net0",
                      endpoint=1 if failure == "endpoint" else 0)
    connector = _session(cparams, ctx=222)
    told = listener.handshake_completed(0.0, None, PAYLOAD)
    to_l = _sends(connector.handshake_completed(0.0, lfp, PAYLOAD))
    while to_l:
        msg = to_l.pop(0)
        if failure == "bad signature" and isinstance(msg, Auth):
            msg = _bad_signature(msg)
        out = listener.receive(msg, 0.1)
        told += out
        for m in _sends(out):
            to_l += _sends(connector.receive(m, 0.2))
    sent = _sends(told)
    assert [type(m) for m in sent] == [Challenge, Close], sent
    assert sent[-1] == Close(code=int(ErrorCode.AUTH_FAILED), reason=AUTH_FAILED_REASON)
    closed = told[-1]
    assert isinstance(closed, Closed) and closed.wire_reason == AUTH_FAILED_REASON
    assert closed.reason != AUTH_FAILED_REASON  # the local log keeps the detail
    assert listener.close_code is ErrorCode.AUTH_FAILED
    if failure == "endpoint":  # e.g. one end on a shared port, the other on per-queue ports: say what to check
        assert "queue 1 reached our queue 0" in closed.reason and "underlay.ports" in closed.reason


def test_connector_closes_a_wrong_listener_with_the_same_code_and_reason() -> None:
    _, other_fp = _keys()
    _, connector, _, _ = _pair()
    actions = connector.handshake_completed(0.0, other_fp, PAYLOAD)
    assert _sends(actions) == [Close(code=int(ErrorCode.AUTH_FAILED), reason=AUTH_FAILED_REASON)]
    assert actions[-1].wire_reason == AUTH_FAILED_REASON


def test_route_epochs_stale_ignored() -> None:
    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    a = connector.receive(RouteUpdate(add_routes=("198.19.10.0/24",), remove_routes=(), route_epoch=5), 1.0)
    assert a == [RoutesChanged(5, ("198.19.10.0/24",), ("198.19.0.1/24",))]
    assert connector.receive(RouteUpdate(add_routes=("198.19.11.0/24",), remove_routes=(), route_epoch=5), 1.1) == []
    assert connector.receive(RouteUpdate(add_routes=(), remove_routes=("198.19.10.0/24",), route_epoch=3), 1.2) == []
    assert connector.stale_route_updates == 2
    b = connector.receive(RouteUpdate(add_routes=(), remove_routes=("198.19.10.0/24",), route_epoch=6), 1.3)
    assert b == [RoutesChanged(6, (), ("198.19.0.1/24",))]
    assert connector.state is State.ESTABLISHED


def _readvertised(session, routes):
    import dataclasses

    p = session.params
    return dataclasses.replace(p, advertised_routes=routes, route_epoch=p.route_epoch + 1)


def test_advertise_when_established_sends_the_difference_with_a_new_epoch() -> None:
    listener, connector, lfp, _ = _pair(routes=("198.19.10.0/24", "198.19.11.0/24"))
    _run(listener, connector, lfp)
    assert connector.peer_routes == {"198.19.10.0/24", "198.19.11.0/24"}
    out = listener.advertise(_readvertised(listener, ("198.19.11.0/24", "198.19.12.0/24")))
    assert _sends(out) == [RouteUpdate(add_routes=("198.19.12.0/24",), remove_routes=("198.19.10.0/24",),
                                       route_epoch=2)]
    assert connector.receive(_sends(out)[0], 1.0) == [
        RoutesChanged(2, ("198.19.11.0/24", "198.19.12.0/24"), ("198.19.0.1/24",))]
    assert listener.advertise(_readvertised(listener, ("198.19.11.0/24", "198.19.12.0/24"))) == []  # no change


def test_advertise_before_ready_goes_into_ready() -> None:
    listener, connector, lfp, _ = _pair(routes=("198.19.10.0/24",))
    assert listener.advertise(_readvertised(listener, ("198.19.12.0/24",))) == []
    all_l, _ = _run(listener, connector, lfp)
    ready = next(m for m in _sends(all_l) if isinstance(m, Ready))
    assert ready.peer_advertised_routes == ("198.19.12.0/24",) and ready.route_epoch == 2
    assert connector.peer_routes == {"198.19.12.0/24"}


def test_advertise_after_own_ready_catches_up_when_established() -> None:
    """The connector's READY is out, the listener's not yet back: the step to
    ESTABLISHED sends the difference, which the (established) listener takes."""
    lraw, lfp = _keys()
    craw, cfp = _keys()
    listener = _session(_params(PeerRole.LISTEN, lraw, cfp), ctx=111)
    connector = _session(_params(PeerRole.CONNECT, craw, lfp, routes=("198.19.20.0/24",)), ctx=222)
    listener.handshake_completed(0.0, None, PAYLOAD)
    hello = _sends(connector.handshake_completed(0.0, lfp, PAYLOAD))
    challenge = _sends(listener.receive(hello[0], 0.1))
    auth = _sends(connector.receive(challenge[0], 0.15))
    hello_ready = _sends(listener.receive(auth[0], 0.2))  # the listener's HELLO + READY
    ready = _sends(connector.receive(hello_ready[0], 0.25))  # the connector's READY (old routes)
    assert connector.advertise(_readvertised(connector, ("198.19.21.0/24",))) == []
    listener.receive(ready[0], 0.3)
    assert listener.state is State.ESTABLISHED and listener.peer_routes == {"198.19.20.0/24"}
    out = connector.receive(hello_ready[1], 0.4)  # the listener's READY
    update = [m for m in _sends(out) if isinstance(m, RouteUpdate)]
    assert update == [RouteUpdate(add_routes=("198.19.21.0/24",), remove_routes=("198.19.20.0/24",), route_epoch=2)]
    assert listener.receive(update[0], 0.5)[-1] == RoutesChanged(2, ("198.19.21.0/24",), ("198.19.0.2/24",))


def test_keepalive_and_dead_peer() -> None:
    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    assert connector.tick(0.5) == []
    ka = _sends(connector.tick(1.1))
    assert len(ka) == 1 and isinstance(ka[0], Keepalive)
    listener.receive(ka[0], 1.2)
    assert listener.peer_counters == ka[0]
    assert connector.next_deadline() <= 2.1 + 1e-9
    actions = listener.tick(1.2 + KA * 3 + 0.01)
    assert listener.close_code is ErrorCode.DEAD_PEER
    assert isinstance(actions[-1], Closed)


def test_handshake_bounded_by_dead_peer_timer() -> None:
    raw, _ = _keys()
    _, fp = _keys()
    s = _session(_params(PeerRole.LISTEN, raw, fp))
    assert s.tick(KA * 3 + 0.1)[-1] == Closed(ErrorCode.DEAD_PEER, "peer silent for too long", local=True)


def test_peer_close_accepted_in_any_state() -> None:
    raw, _ = _keys()
    _, fp = _keys()
    s = _session(_params(PeerRole.LISTEN, raw, fp))
    s.handshake_completed(0.0, None, PAYLOAD)
    actions = s.receive(Close(code=int(ErrorCode.SHUTDOWN), reason="bye"), 0.5)
    # Not authenticated yet: the stranger's words are not kept (see below).
    assert actions == [Closed(ErrorCode.SHUTDOWN, "(reason withheld: peer not authenticated)", local=False)]
    assert s.receive(Close(code=99, reason="again"), 0.6) == []


HOSTILE = "\x1b]0;owned\x07\x1b[2J\rroot# \u202egnp.exe\x9b"
HOSTILE_SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\x0droot# \\u202egnp.exe\\x9b"


def test_close_reason_of_an_unauthenticated_peer_is_withheld() -> None:
    """A stranger's CLOSE reason (listener before AUTH verified, connector
    before the pinned certificate matched) never reaches the Closed reason, and
    neither does a QUIC reason phrase passed through `peer_text`."""
    _, stranger_fp = _keys()
    for state_reached in ("await_hello", "await_auth"):
        listener, connector, lfp, _ = _pair()
        listener.handshake_completed(0.0, None, PAYLOAD)
        if state_reached == "await_auth":
            hello = _sends(connector.handshake_completed(0.0, lfp, PAYLOAD))
            listener.receive(hello[0], 0.1)
            assert listener.state is State.AWAIT_AUTH
        assert not listener.authenticated
        assert listener.peer_text(HOSTILE) == "(reason withheld: peer not authenticated)"
        out = listener.receive(Close(code=int(ErrorCode.SHUTDOWN), reason=HOSTILE), 0.2)
        assert out[-1].reason == "(reason withheld: peer not authenticated)"
        assert "\x1b" not in out[-1].reason
    _, connector, _, _ = _pair()
    assert not connector.authenticated
    assert connector.peer_text(HOSTILE) == "(reason withheld: peer not authenticated)"
    connector.handshake_completed(0.0, stranger_fp, PAYLOAD)  # wrong pin
    assert not connector.authenticated
    assert connector.peer_text("") == ""


def test_close_reason_of_an_authenticated_peer_is_escaped() -> None:
    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    assert listener.authenticated and connector.authenticated
    out = connector.receive(Close(code=int(ErrorCode.SHUTDOWN), reason=HOSTILE), 1.0)
    assert out == [Closed(ErrorCode.SHUTDOWN, HOSTILE_SHOWN, local=False)]
    assert out[-1].reason == HOSTILE_SHOWN
    assert listener.peer_text(HOSTILE) == HOSTILE_SHOWN


def test_own_close_reason_is_bounded_and_escaped() -> None:
    """A reason of ours quoting the peer (a decode error) cannot break the
    CLOSE message's schema (Reason: 512 characters) nor carry controls."""
    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    out = listener.protocol_error("bad control message: " + HOSTILE * 100)
    close = _sends(out)[0]
    assert isinstance(close, Close) and len(close.reason) == 512 and "\x1b" not in close.reason
    assert close.reason.startswith("bad control message: \\x1b]0;owned")


def _prefixes(start: int, n: int) -> tuple[str, ...]:
    return tuple(f"10.{(start + i) // 256}.{(start + i) % 256}.0/24" for i in range(n))


def test_routes_adding_up_beyond_one_ready_close_with_limit() -> None:
    """Each ROUTE_UPDATE is legal (<= 256 prefixes), but the peer's route set
    must stay within what one READY carries: the update that would pass 256
    closes the session with LIMIT (not an internal error), is counted, and
    changes nothing."""
    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    out = listener.receive(RouteUpdate(add_routes=_prefixes(0, 200), remove_routes=(), route_epoch=2), 1.0)
    assert out[-1] == RoutesChanged(2, tuple(sorted(_prefixes(0, 200))), ("198.19.0.2/24",))
    # Removing 100 and adding 156 lands exactly on the limit: fine.
    out = listener.receive(RouteUpdate(add_routes=_prefixes(200, 156), remove_routes=_prefixes(0, 100),
                                       route_epoch=3), 1.1)
    assert len(out[-1].routes) == 256 and listener.state is State.ESTABLISHED
    before = set(listener.peer_routes)
    out = listener.receive(RouteUpdate(add_routes=_prefixes(356, 1), remove_routes=(), route_epoch=4), 1.2)
    assert listener.state is State.CLOSED and listener.close_code is ErrorCode.LIMIT
    assert _sends(out) == [Close(code=int(ErrorCode.LIMIT), reason="peer advertises 257 routes, more than 256")]
    assert out[-1] == Closed(ErrorCode.LIMIT, "peer advertises 257 routes, more than 256", local=True)
    assert not any(isinstance(a, RoutesChanged) for a in out)
    assert listener.peer_routes == before and listener.route_epoch == 3
    assert listener.counters.peer_route_limit == 1



def test_renew_goes_only_to_a_connector_that_said_it_acts_on_it() -> None:
    from l3ptp.worker.session import RenewRequested

    listener, connector, lfp, _ = _pair()
    _run(listener, connector, lfp)
    # The connector's HELLO lists the feature: the listener may ask; the connector is told why.
    [renew] = _sends(listener.request_renewal("our key changed"))
    assert isinstance(renew, Renew)
    assert connector.receive(renew, 1.0) == [RenewRequested("our key changed")]
    assert connector.state is State.ESTABLISHED
    # Only the listener asks, and only a connector may be asked.
    assert connector.request_renewal("x") == []
    listener.receive(Renew(reason="no"), 1.0)
    assert listener.close_code is ErrorCode.PROTOCOL_VIOLATION
    # A connector whose HELLO did not list it (an older l3ptp) is not asked: it would close the session.
    old_listener, _, _, _ = _pair()
    old_listener.receive(_hello_from(connector.params), 0.1)
    old_listener.state = State.ESTABLISHED
    assert old_listener.request_renewal("x") == []
