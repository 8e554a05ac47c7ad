"""The CLI socket (``control.sock``): who may connect, who may ask what, and the answers.

Shell. The socket is a ZeroMQ ROUTER, 0660 with group ``admin_group``; with
``[controller] polkit = true`` it is 0666 and every request is authorised
per caller first (`l3ptp.controller.polkit`; a failure refuses). Status is
answered at once; up, down and reload are serialised with each other (the
controller's operations lock).
"""

from __future__ import annotations

import grp
import os
from typing import TYPE_CHECKING, Any

import structlog
import zmq.asyncio

from l3ptp.controller.bus import Router
from l3ptp.controller.polkit import Authorizer, PolkitChecker, action_for, parse_peer_address
from l3ptp.ipc.control_messages import (
    CLI_REPLIES,
    CLI_REQUESTS,
    CommandFailed,
    CommandResult,
    DownRequest,
    ReloadRequest,
    StatusRequest,
    UpRequest,
)
from l3ptp.ipc.errors import ErrorCode

if TYPE_CHECKING:
    from l3ptp.controller.app import Controller

__all__ = ["CONTROL_SOCKET_MODE", "CONTROL_SOCKET_MODE_POLKIT", "CliServer"]

CONTROL_SOCKET_MODE = 0o660
#: With ``[controller] polkit = true`` anyone may connect; every request is
#: authorised per caller (SO_PEERCRED, then polkit).
CONTROL_SOCKET_MODE_POLKIT = 0o666

log = structlog.get_logger("l3ptp.controller")


class CliServer:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        #: Per-caller authorisation of CLI requests; set at start when
        #: ``[controller] polkit`` is true (fixed until the controller restarts).
        self.authorizer: Authorizer | None = None
        self.router: Router | None = None

    def admin_gid(self) -> int | None:
        """The gid of admin_group, None when unset or unknown (logged)."""
        group = self.ctl.config.controller.admin_group
        if not group:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            log.error("admin_group_not_applied", group=group, error="no such group")
            return None

    def open(self, ctx: zmq.asyncio.Context, path: str, admin_gid: int | None) -> Router:
        """Bind the CLI socket at `path` (the authoriser first, with polkit)."""
        if self.ctl.config.controller.polkit:
            # Before the socket exists: no request is ever served unchecked.
            self.authorizer = Authorizer(PolkitChecker(), own_uid=os.geteuid(), admin_gid=admin_gid)
        self.router = Router(
            ctx,
            path,
            CLI_REQUESTS,
            CLI_REPLIES,
            mode=CONTROL_SOCKET_MODE_POLKIT if self.authorizer is not None else CONTROL_SOCKET_MODE,
            group=admin_gid,
        )
        return self.router

    async def run(self) -> None:
        cli = self.router
        assert cli is not None
        while True:
            if self.authorizer is None:
                got = await cli.recv()
                if got is None:
                    continue
                ident, msg = got
            else:
                got_peer = await cli.recv_with_peer()
                if got_peer is None:
                    continue
                ident, msg, peer = got_peer
                refusal = await self.authorise(msg, peer)
                if refusal is not None:
                    await cli.send(ident, refusal)
                    continue
            try:
                reply = await self.on_request(msg)
            except Exception as exc:  # never let one request kill the controller
                log.error("cli_request_failed", error=repr(exc))
                reply = CommandFailed(code=ErrorCode.INTERNAL, reason=str(exc)[:512])
            await cli.send(ident, reply)

    async def authorise(self, msg: Any, peer_address: str | None) -> CommandFailed | None:
        """None if the caller may make this request, else the refusal to send (fail closed)."""
        assert self.authorizer is not None
        action = action_for(msg)
        peer = parse_peer_address(peer_address)
        try:
            decision = await self.authorizer.authorize(peer, action)
        except Exception as exc:  # a bug here must refuse, never allow
            log.error("cli_authorisation_failed", action=action, error=repr(exc))
            return CommandFailed(code=ErrorCode.NOT_PERMITTED, reason=f"not authorised: {action} (internal error)")
        who = {"uid": peer.uid, "pid": peer.pid} if peer is not None else {"peer": str(peer_address)[:80]}
        if decision.allowed:
            if decision.how == "polkit":
                log.info("cli_authorised", action=action, how=decision.how, **who)
            return None
        log.warning("cli_refused", action=action, how=decision.how, reason=decision.reason, **who)
        hint = "run as root, join the controller's admin_group, or ask for a polkit rule"
        return CommandFailed(
            code=ErrorCode.NOT_PERMITTED, reason=f"not authorised: {action}: {decision.reason} ({hint})"[:512]
        )

    async def on_request(self, msg: Any) -> Any:
        if isinstance(msg, StatusRequest):
            return self.ctl.status(verbose=msg.verbose)
        async with self.ctl.ops:
            return await self.on_command(msg)

    async def on_command(self, msg: Any) -> Any:
        ctl = self.ctl
        if isinstance(msg, ReloadRequest):
            return await ctl.reloader.reload()
        if isinstance(msg, UpRequest | DownRequest):
            net = ctl.config.network(msg.name)
            if net is None:
                return CommandFailed(code=ErrorCode.NOT_FOUND, reason=f"no network {msg.name!r} in the configuration")
            if isinstance(msg, UpRequest):
                ctl.admin_down.discard(msg.name)
                rt = ctl.networks.get(msg.name)
                if rt is not None and not rt.sup.failed:
                    return CommandResult(ok=True, message=f"{msg.name} is already up", errors=())
                if rt is not None:
                    await ctl.lifecycle.bring_down(msg.name, "restart after failure")
                await ctl.lifecycle.bring_up(net)
                return CommandResult(ok=True, message=f"{msg.name} is coming up", errors=())
            ctl.admin_down.add(msg.name)
            await ctl.lifecycle.bring_down(msg.name, "down requested")
            return CommandResult(ok=True, message=f"{msg.name} is down", errors=())
        return CommandFailed(code=ErrorCode.BAD_REQUEST, reason=f"unsupported request {type(msg).__name__}")
