"""Reload (SIGHUP or `l3ptp reload`): re-read the file and apply only the difference.

Shell around `l3ptp.controller.plan`. An invalid file is refused with every
error and nothing changes. Networks removed or changed are brought down
(destroyed), the configuration is replaced, networks whose advertised routes
alone changed keep running and their workers are told the new routes, and
networks changed or added (enabled, not taken down by `l3ptp down`) are
brought up.
"""

from __future__ import annotations

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
        old = ctl.config
        for name in (*plan.removed, *plan.changed):
            await ctl.lifecycle.bring_down(name, "reload")
        ctl.config = new
        ctl.admin_down &= {n.name for n in new.networks}
        for name in plan.readvertised:
            rt = ctl.networks.get(name)
            net = new.network(name)
            if rt is not None and net is not None:
                rt.reconfigure(net)
                for queue in list(rt.idents):
                    await ctl.worker_bus.advertise(rt, queue)
        for name in (*plan.changed, *plan.added):
            net = new.network(name)
            if net is not None and net.enabled and name not in ctl.admin_down:
                await ctl.lifecycle.bring_up(net)
        log.info("reloaded", summary=plan.summary(), before=len(old.networks), after=len(new.networks))
        return CommandResult(ok=True, message=plan.summary(), errors=())
