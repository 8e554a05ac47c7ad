"""Per-caller authorisation of CLI requests, with polkit for everyone not trusted outright.

Used when ``[controller] polkit = true``: ``control.sock`` is then 0666 and
every request is authorised here instead of by the socket's file mode.

* Who is calling: libzmq stores the peer's ``SO_PEERCRED`` of an ``ipc://``
  connection in each message's ``Peer-Address`` property, as
  ``"<host>:<uid>:<gid>:<pid>"`` (verified on libzmq 4.3; the kernel fills
  it in at connect time, the caller cannot choose it). `parse_peer_address`
  reads it; anything else is no caller (refused).
* Trusted outright, without asking polkit: uid 0, the controller's own uid,
  and members of ``admin_group`` (the caller's gid, or the group list of the
  uid's user in the user database -- the same list polkit's
  ``subject.isInGroup`` uses).
* Everyone else: ``CheckAuthorization`` of ``org.freedesktop.PolicyKit1`` on
  the system bus (jeepney, asyncio) for a ``unix-process`` subject (pid,
  start time from ``/proc/<pid>/stat``, uid from SO_PEERCRED), with action
  ``org.l3ptp.status`` for status and ``org.l3ptp.manage`` for up, down and
  reload, no user interaction (the CLI has no authentication agent). Any
  answer but "authorised" -- a challenge (``auth_admin``), "no", a D-Bus
  error, no bus, no answer within ``POLKIT_TIMEOUT`` -- refuses the request
  (fail closed).

A controller that is not root may only ask polkit about other users for
actions it owns: the action file annotates both actions with
``org.freedesktop.policykit.owner = unix-user:l3ptp``.

The parsing and the decision order are pure; `PolkitChecker` is the only
part that does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
from collections.abc import Awaitable, Callable
from typing import Any

from l3ptp.ipc.constants import POLKIT_ACTION_MANAGE, POLKIT_ACTION_STATUS, POLKIT_TIMEOUT

__all__ = [
    "ACTION_MANAGE",
    "ACTION_STATUS",
    "Authorizer",
    "Decision",
    "PeerCred",
    "PolkitChecker",
    "PolkitError",
    "action_for",
    "parse_peer_address",
    "process_start_time",
    "user_in_group",
]

ACTION_STATUS = POLKIT_ACTION_STATUS
ACTION_MANAGE = POLKIT_ACTION_MANAGE

POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_OBJECT = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
#: CheckAuthorizationFlags: 0 = no user interaction.
POLKIT_FLAGS_NONE = 0

_UID_MAX = 2**32 - 2  # (uid_t)-1 is "no uid"
_PID_MAX = 2**22  # PID_MAX_LIMIT on 64-bit Linux


class PolkitError(Exception):
    """polkit could not be asked or did not answer (the request is refused)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCred:
    """SO_PEERCRED of a CLI connection: uid, gid and pid at connect time."""

    uid: int
    gid: int
    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may run, and why (``how`` is logged)."""

    allowed: bool
    how: str
    reason: str = ""


def parse_peer_address(value: str | None) -> PeerCred | None:
    """``"<host>:<uid>:<gid>:<pid>"`` (libzmq's ipc:// Peer-Address) -> PeerCred; else None."""
    if not isinstance(value, str):
        return None
    parts = value.rsplit(":", 3)
    if len(parts) != 4:
        return None
    numbers = parts[1:]
    if not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in numbers):
        return None
    uid, gid, pid = (int(p) for p in numbers)
    if uid > _UID_MAX or gid > _UID_MAX or pid > _PID_MAX:
        return None
    return PeerCred(uid=uid, gid=gid, pid=pid)


def parse_start_time(stat: str) -> int | None:
    """Field 22 (starttime, clock ticks since boot) of a /proc/<pid>/stat line; None if malformed.

    The command name (field 2) is in parentheses and may itself contain
    spaces and parentheses, so the fields are counted after the last ")".
    """
    _, paren, rest = stat.rpartition(")")
    if not paren:
        return None
    fields = rest.split()
    # rest starts with field 3 (state); starttime is field 22.
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def process_start_time(pid: int, *, proc: str = "/proc") -> int:
    """Start time of `pid` for polkit's unix-process subject; 0 if it cannot be read.

    0 tells polkit to look the start time up itself; that is what happens
    under the controller unit's ``ProtectProc=invisible`` (other users'
    processes are hidden from the controller, not from polkitd).
    """
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as fh:
            value = parse_start_time(fh.read())
    except OSError:
        return 0
    return value if value is not None else 0


def action_for(msg: Any) -> str:
    """The polkit action a CLI request needs: status reads, everything else manages."""
    from l3ptp.ipc.control_messages import StatusRequest

    return ACTION_STATUS if isinstance(msg, StatusRequest) else ACTION_MANAGE


def user_in_group(uid: int, gid: int, group_gid: int) -> bool:
    """Whether a caller (uid, primary gid) belongs to `group_gid` by the user database."""
    if gid == group_gid:
        return True
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False
    if pw.pw_gid == group_gid:
        return True
    try:
        return group_gid in os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        return False


#: async (peer, start_time, action) -> authorised?; raises PolkitError when it cannot tell.
Check = Callable[[PeerCred, int, str], Awaitable[bool]]


class Authorizer:
    """Decides for one (caller, action); trusted callers first, then polkit."""

    def __init__(
        self,
        check: Check,
        *,
        own_uid: int,
        admin_gid: int | None,
        start_time: Callable[[int], int] = process_start_time,
        in_group: Callable[[int, int, int], bool] = user_in_group,
    ) -> None:
        self._check = check
        self.own_uid = own_uid
        self.admin_gid = admin_gid
        self._start_time = start_time
        self._in_group = in_group

    def trusted(self, peer: PeerCred) -> str | None:
        """Why `peer` needs no polkit check ("root", "controller-user", "admin-group"), or None."""
        if peer.uid == 0:
            return "root"
        if peer.uid == self.own_uid:
            return "controller-user"
        if self.admin_gid is not None and self._in_group(peer.uid, peer.gid, self.admin_gid):
            return "admin-group"
        return None

    async def authorize(self, peer: PeerCred | None, action: str) -> Decision:
        if peer is None:
            return Decision(False, "no-credentials", "the caller's credentials are unknown")
        how = self.trusted(peer)
        if how is not None:
            return Decision(True, how)
        if peer.pid <= 0:
            return Decision(False, "no-pid", "the caller's process is not visible to the controller")
        try:
            ok = await self._check(peer, self._start_time(peer.pid), action)
        except PolkitError as exc:
            return Decision(False, "polkit-error", f"polkit could not be asked: {exc}")
        if ok:
            return Decision(True, "polkit")
        return Decision(False, "polkit", "polkit did not authorise it")


class PolkitChecker:
    """``CheckAuthorization`` over the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` or the default socket).

    One connection per check: CLI requests are rare, and a polkitd or bus
    restart then needs no reconnection logic.
    """

    def __init__(self, *, timeout: float = POLKIT_TIMEOUT, bus: str = "SYSTEM") -> None:
        self.timeout = timeout
        self.bus = bus

    @staticmethod
    def message(peer: PeerCred, start_time: int, action: str) -> Any:
        from jeepney import DBusAddress, new_method_call

        authority = DBusAddress(POLKIT_OBJECT, bus_name=POLKIT_BUS_NAME, interface=POLKIT_INTERFACE)
        subject = (
            "unix-process",
            {"pid": ("u", peer.pid), "start-time": ("t", start_time), "uid": ("i", peer.uid)},
        )
        return new_method_call(
            authority, "CheckAuthorization", "(sa{sv})sa{ss}us", (subject, action, {}, POLKIT_FLAGS_NONE, "")
        )

    async def __call__(self, peer: PeerCred, start_time: int, action: str) -> bool:
        from jeepney import DBusErrorResponse
        from jeepney.io.asyncio import open_dbus_router
        from jeepney.wrappers import unwrap_msg

        msg = self.message(peer, start_time, action)
        try:
            async with asyncio.timeout(self.timeout):
                async with open_dbus_router(self.bus) as router:
                    reply = await router.send_and_get_reply(msg)
            (authorized, _challenge, _details), = unwrap_msg(reply)
        except TimeoutError:
            raise PolkitError(f"no answer within {self.timeout:g}s") from None
        except DBusErrorResponse as exc:
            raise PolkitError(f"{exc.name}: {str(exc.data[0])[:200] if exc.data else ''}") from None
        except Exception as exc:  # fail closed on anything else: no bus, bad address, auth, malformed reply
            raise PolkitError(f"{type(exc).__name__}: {exc}"[:300]) from None
        return authorized is True
