"""Reload (SIGHUP or `l3ptp reload`): re-read the file and apply only the difference.

Shell around `l3ptp.controller.plan`. An invalid file, or a key file of a
running network that cannot be read, is refused with every error and nothing
changes. Networks removed or changed are brought down (destroyed), the
configuration is replaced, networks with live changes alone (plan.LIVE_FIELDS,
or a key file whose contents changed) keep running: their workers are told the
new routes (Advertise) and keys (Rekey: the session is renewed without a gap
where it no longer matches them), the peers' routes are judged again by the new
accepted_routes; networks changed or added (enabled, not taken down by
`l3ptp down`) are brought up.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import structlog

from l3ptp.controller import plan as planning
from l3ptp.controller.config import Config, ConfigError, load_config
from l3ptp.ipc.control_messages import CommandFailed, CommandResult
from l3ptp.ipc.errors import ErrorCode

if TYPE_CHECKING:
    from l3ptp.controller.app import Controller

__all__ = ["Reloader"]

log = structlog.get_logger("l3ptp.controller")


class Reloader:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    async def reload(self) -> CommandResult | CommandFailed:
        """Re-read the file and apply only the difference; invalid files change nothing."""
        if self.ctl.config_path is None:
            return CommandFailed(code=ErrorCode.UNAVAILABLE, reason="started without a configuration file")
        try:
            new = load_config(self.ctl.config_path)
        except ConfigError as exc:
            log.error("reload_rejected", errors=list(exc.errors))
            return CommandResult(
                ok=False,
                message=f"configuration rejected, nothing changed ({len(exc.errors)} errors)",
                errors=tuple(e[:512] for e in exc.errors[:1024]),
            )
        return await self.apply(new)

    async def apply(self, new: Config) -> CommandResult:
        ctl = self.ctl
        plan = planning.diff(ctl.config, new)
        keys: dict[str, bytes] = {}
        errors = []
        for name in (*plan.live, *plan.unchanged):  # running networks that keep running: their keys now
            net = new.network(name)
            if net is not None and name in ctl.networks:
                try:
                    keys[name] = ctl.key_loader(net.key_path(new.node))
                except Exception as exc:  # noqa: BLE001 - OSError, a malformed key: refused, nothing changes
                    errors.append(f"networks.{name}: cannot read key file {net.key_path(new.node)}: {exc}")
        if errors:
            log.error("reload_rejected", errors=errors)
            return CommandResult(ok=False, message=f"key file unreadable, nothing changed ({len(errors)} errors)",
                                 errors=tuple(e[:512] for e in errors))
        rekeyed = tuple(n for n in plan.unchanged if n in keys and keys[n] != ctl.networks[n].key)
        if rekeyed:  # the same file with new contents: live too
            plan = dataclasses.replace(plan, live=plan.live + rekeyed,
                                       unchanged=tuple(n for n in plan.unchanged if n not in rekeyed))
        old = ctl.config
        for name in (*plan.removed, *plan.changed):
            await ctl.lifecycle.bring_down(name, "reload")
        ctl.config = new
        ctl.admin_down &= {n.name for n in new.networks}
        for name in plan.live:
            rt = ctl.networks.get(name)
            net = new.network(name)
            if rt is not None and net is not None:
                rt.reconfigure(net, keys[name])
                for queue in list(rt.idents):
                    if rt.advertised.get(queue) != net.advertised_routes:
                        await ctl.worker_bus.advertise(rt, queue)
                    if rt.keyed.get(queue) != rt.keying():
                        await ctl.worker_bus.rekey(rt, queue)
                await ctl.lifecycle.apply_routes(rt)
        for name in (*plan.changed, *plan.added):
            net = new.network(name)
            if net is not None and net.enabled and name not in ctl.admin_down:
                await ctl.lifecycle.bring_up(net)
        log.info("reloaded", summary=plan.summary(), before=len(old.networks), after=len(new.networks))
        return CommandResult(ok=True, message=plan.summary(), errors=())
