"""Per-caller authorisation of CLI requests (controller/polkit.py), without a bus.

The real polkitd on a private system bus is exercised by
tests/integration/test_polkit.py; here: parsing libzmq's Peer-Address and
/proc/<pid>/stat, the decision order (trusted callers never reach polkit,
everything polkit does not say yes to is refused), the request -> action
mapping and the exact CheckAuthorization call.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from l3ptp.controller.polkit import (
    ACTION_MANAGE,
    ACTION_STATUS,
    Authorizer,
    PeerCred,
    PolkitChecker,
    PolkitError,
    action_for,
    parse_peer_address,
    parse_start_time,
    process_start_time,
    user_in_group,
)
from l3ptp.ipc.control_messages import DownRequest, ReloadRequest, StatusRequest, UpRequest

pytestmark = pytest.mark.timeout(30)


# ---- Peer-Address -------------------------------------------------------------------------


def test_peer_address_of_an_ipc_connection() -> None:
    assert parse_peer_address("localhost:1000:100:4242") == PeerCred(uid=1000, gid=100, pid=4242)
    assert parse_peer_address("localhost:0:0:1") == PeerCred(0, 0, 1)
    # Only the last three fields count, whatever the host part holds.
    assert parse_peer_address("::1:5:6:7") == PeerCred(5, 6, 7)


@pytest.mark.parametrize(
    "value",
    [None, "", "localhost", "localhost:1:2", "1:2:3", "localhost:a:0:1", "localhost:-1:0:1", "localhost:1:0:",
     "localhost: 1:0:1", "localhost:\u0661:0:1", "localhost:4294967295:0:1", "localhost:1:0:99999999999",
     b"localhost:0:0:1"],
)
def test_anything_else_is_no_caller(value: object) -> None:
    assert parse_peer_address(value) is None  # type: ignore[arg-type]


# ---- /proc/<pid>/stat ---------------------------------------------------------------------------------


def test_start_time_is_field_22_counted_after_the_command_name() -> None:
    rest = " ".join(["S", "1"] + ["0"] * 17 + ["123456", "99"])  # fields 3..23
    assert parse_start_time(f"42 (a) b (c) d) {rest}") == 123456
    assert parse_start_time("42 (x) S 1") is None
    assert parse_start_time("no parenthesis at all") is None


def test_start_time_of_a_real_process_and_of_a_missing_one() -> None:
    with open(f"/proc/{os.getpid()}/stat") as fh:
        expected = int(fh.read().rpartition(")")[2].split()[19])
    assert process_start_time(os.getpid()) == expected > 0
    with tempfile.TemporaryDirectory() as empty:
        assert process_start_time(1, proc=empty) == 0  # not visible: polkit looks it up itself


# ---- actions -------------------------------------------------------------------------------------------


def test_status_reads_everything_else_manages() -> None:
    assert ACTION_STATUS == "org.l3ptp.status" and ACTION_MANAGE == "org.l3ptp.manage"
    assert action_for(StatusRequest(verbose=False)) == ACTION_STATUS
    for msg in (UpRequest(name="a"), DownRequest(name="a"), ReloadRequest()):
        assert action_for(msg) == ACTION_MANAGE


# ---- decisions -----------------------------------------------------------------------------------------

ADMIN_GID = 4242


class FakePolkit:
    def __init__(self, answer: bool | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[PeerCred, int, str]] = []

    async def __call__(self, peer: PeerCred, start_time: int, action: str) -> bool:
        self.calls.append((peer, start_time, action))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def authorizer(polkit: FakePolkit, admin_gid: int | None = ADMIN_GID) -> Authorizer:
    return Authorizer(
        polkit,
        own_uid=500,
        admin_gid=admin_gid,
        start_time=lambda pid: pid * 10,
        in_group=lambda uid, gid, group: uid == 700 and group == ADMIN_GID,
    )


def decide(auth: Authorizer, peer: PeerCred | None, action: str = ACTION_MANAGE) -> tuple[bool, str]:
    d = asyncio.run(auth.authorize(peer, action))
    return d.allowed, d.how


def test_root_own_user_and_admin_group_never_reach_polkit() -> None:
    polkit = FakePolkit(PolkitError("must not be asked"))
    auth = authorizer(polkit)
    assert decide(auth, PeerCred(0, 0, 1)) == (True, "root")
    assert decide(auth, PeerCred(500, 500, 2)) == (True, "controller-user")
    assert decide(auth, PeerCred(700, 700, 3)) == (True, "admin-group")
    assert polkit.calls == []


def test_without_admin_group_a_member_is_asked_like_anyone() -> None:
    polkit = FakePolkit(False)
    assert decide(authorizer(polkit, admin_gid=None), PeerCred(700, 700, 3)) == (False, "polkit")
    assert len(polkit.calls) == 1


def test_others_are_asked_with_pid_start_time_uid_and_the_action() -> None:
    polkit = FakePolkit(True)
    auth = authorizer(polkit)
    assert decide(auth, PeerCred(1000, 1000, 77), ACTION_STATUS) == (True, "polkit")
    assert polkit.calls == [(PeerCred(1000, 1000, 77), 770, ACTION_STATUS)]


def test_polkit_no_error_unknown_caller_or_pid_is_refused() -> None:
    assert decide(authorizer(FakePolkit(False)), PeerCred(1000, 1000, 77)) == (False, "polkit")
    refused = asyncio.run(authorizer(FakePolkit(PolkitError("no bus"))).authorize(PeerCred(1000, 1000, 77), ACTION_STATUS))
    assert not refused.allowed and refused.how == "polkit-error" and "no bus" in refused.reason
    never = FakePolkit(True)
    assert decide(authorizer(never), None) == (False, "no-credentials")
    assert decide(authorizer(never), PeerCred(1000, 1000, 0)) == (False, "no-pid")
    assert never.calls == []


def test_user_in_group_by_gid_and_by_user_database() -> None:
    assert user_in_group(123456, 4242, 4242)
    assert not user_in_group(2**31, 4243, 4242)  # no such user
    assert user_in_group(0, 99999, 0)  # root's primary group in /etc/passwd


# ---- the D-Bus call --------------------------------------------------------------------------------------


def test_check_authorization_message() -> None:
    msg = PolkitChecker.message(PeerCred(uid=1000, gid=1000, pid=77), 12345, ACTION_MANAGE)
    fields = {k.name: v for k, v in msg.header.fields.items()}
    assert fields["destination"] == "org.freedesktop.PolicyKit1"
    assert fields["path"] == "/org/freedesktop/PolicyKit1/Authority"
    assert fields["interface"] == "org.freedesktop.PolicyKit1.Authority"
    assert fields["member"] == "CheckAuthorization"
    assert fields["signature"] == "(sa{sv})sa{ss}us"
    subject, action, details, flags, cancel = msg.body
    assert subject == ("unix-process", {"pid": ("u", 77), "start-time": ("t", 12345), "uid": ("i", 1000)})
    assert (action, details, flags, cancel) == (ACTION_MANAGE, {}, 0, "")  # 0: no user interaction


def test_no_bus_is_a_polkit_error_not_an_answer() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checker = PolkitChecker(bus=f"unix:path={tmp}/no-bus", timeout=2)
        with pytest.raises(PolkitError):
            asyncio.run(checker(PeerCred(1000, 1000, os.getpid()), 0, ACTION_STATUS))
