"""`l3ptp-helper`: argv, policy, capability check, hardening, reconcile, serve. Nothing else."""

import argparse
import signal
import sys
import time

from l3ptp.ipc.constants import HELPER_POLICY_DEFAULT
from l3ptp.ipc.hardening import harden_process
from l3ptp.ipc.logsetup import configure

from .dispatch import Dispatcher, audit
from .netops import Kernel
from .policy import PolicyError, load_policy
from .server import Server, open_listener, systemd_listener
from .state import HelperState

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _capeff(status_path: str) -> int:
    """This process's effective capabilities (StopIteration: no CapEff line)."""
    with open(status_path) as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))


def missing_capabilities(status_path: str = "/proc/self/status") -> str | None:
    """None if this process can do its job, else a message naming what is missing."""
    try:
        capeff = _capeff(status_path)
    except (OSError, StopIteration, ValueError):
        return f"cannot read CapEff from {status_path}"
    if not capeff & (1 << CAP_NET_ADMIN):
        return "missing capability CAP_NET_ADMIN (run as root or with AmbientCapabilities=CAP_NET_ADMIN)"
    return None


def steering_warning(status_path: str = "/proc/self/status") -> str | None:
    """Without CAP_BPF (or CAP_SYS_ADMIN) shared-port networks cannot be steered: said at start, and refused
    with the same words at each shared-port ProtectSocket (per-queue networks work)."""
    try:
        capeff = _capeff(status_path)
    except StopIteration:
        capeff = 0
    if capeff & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN):
        return None
    return 'missing capability CAP_BPF: networks with underlay.ports = "shared" will fail; add CAP_BPF or set underlay.ports = "per-queue"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l3ptp-helper", description="l3ptp privileged helper")
    parser.add_argument("--policy", default=HELPER_POLICY_DEFAULT, help="root-owned policy file (TOML)")
    parser.add_argument("--socket", help="listen here instead of the policy's socket_path")
    parser.add_argument("--reconcile-only", action="store_true", help="adopt what a previous helper left and exit")
    parser.add_argument("--cleanup", action="store_true", help="remove all of ours (opens the prefixes) and exit")
    args = parser.parse_args(argv)
    log = configure("helper")
    try:
        policy, missing = load_policy(args.policy), missing_capabilities()
    except PolicyError as exc:
        policy, missing = None, str(exc)
    if policy is None or missing:
        log.error("policy_invalid" if policy is None else "capability_missing", reason=missing)
        print(f"l3ptp-helper: {missing}", file=sys.stderr)
        return 2 if policy is None else 1
    harden_process()
    warning = steering_warning()
    if warning:
        log.warning("capability_missing", reason=warning)
    kernel = Kernel(policy)
    if args.cleanup:
        audit("cleanup", result="ok", **kernel.cleanup())
        kernel.close()
        return 0
    dispatcher = Dispatcher(policy, HelperState(), kernel, audit, time.monotonic)
    found, dropped, guards = kernel.adopt()
    done = dispatcher.adopt(found, guards)
    rules = [] if dispatcher.state.networks else kernel.drop_rules()  # rules only matter while a network exists
    audit("reconcile", result="ok", when="start", links=dropped, rules=rules, **done)
    if args.reconcile_only:
        kernel.close()
        return 0
    listener = systemd_listener() or open_listener(args.socket or policy.socket_path, policy.socket_group)
    server = Server(dispatcher, listener)
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop.append(signum))
    log.info("helper_ready", socket=listener.getsockname())
    try:
        while not stop:
            server.step(1.0)  # a signal is seen within this select timeout
    finally:
        # Networks stay (fail-closed): the next helper adopts them; only DestroyNetwork or --cleanup removes one.
        server.close()
        kernel.close()
        log.info("helper_stopped", networks_kept=sorted(dispatcher.state.networks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
