"""`l3ptp`: the operator command. It talks only to the controller.

Transport: a ZeroMQ DEALER to the controller's ROUTER at
``<runtime_dir>/control.sock``. The runtime directory is ``--runtime-dir``
if given, else ``[controller] runtime_dir`` of the configuration file
(``--config``, default ``/etc/l3ptp/l3ptp.toml``) when the caller can read
it, else ``RUNTIME_DIR_DEFAULT`` (``/run/l3ptp/ctl``); ``--socket``
overrides all of them. ZeroMQ connects silently, so before connecting the
CLI checks that the socket file exists (else: the controller is not running)
and that the caller may read and write it (else: permission denied, with the
hint to join the admin group). A request without a reply
within ``--timeout`` seconds is reported as "not answering".

Exit status: 0 success, 1 the controller refused or the command failed,
2 usage error (including an explicit ``--config`` that cannot be read),
3 the controller is unreachable (not running, permission).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import tomllib
from collections.abc import Sequence
from typing import Any, TextIO

from l3ptp.ipc.constants import CONFIG_DEFAULT, CONTROL_SOCKET, RUNTIME_DIR_DEFAULT
from l3ptp.ipc.text import printable

__all__ = [
    "ControllerUnreachable",
    "configured_runtime_dir",
    "format_status",
    "main",
    "request",
    "runtime_dir",
    "status_json",
]

DEFAULT_TIMEOUT = 5.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ControllerUnreachable(Exception):
    """No controller to talk to (message says why and what to do)."""


def request(socket_path: str, msg: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Send one CLI request and return the decoded reply.

    Raises `ControllerUnreachable` (not running, permission denied, no answer,
    or an undecodable answer).
    """
    import zmq

    from l3ptp.ipc.control_messages import CLI_REPLIES, CLI_REQUESTS
    from l3ptp.ipc.errors import DecodeError

    hint = "run as root or as a member of the controller's admin_group"
    try:
        os.stat(socket_path)
    except FileNotFoundError:
        raise ControllerUnreachable(f"the controller is not running (no socket at {socket_path})") from None
    except PermissionError:
        # A parent directory we may not search (the runtime directory itself is 0711).
        raise ControllerUnreachable(f"permission denied reaching {socket_path}: {hint}") from None
    except OSError as exc:
        raise ControllerUnreachable(f"cannot use {socket_path}: {exc.strerror or exc}") from None
    if not os.access(socket_path, os.R_OK | os.W_OK):
        raise ControllerUnreachable(
            f"permission denied on {socket_path}: {hint}"
        )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, CLI_REPLIES.max_bytes + 1)
        sock.connect(f"ipc://{socket_path}")
        sock.send(CLI_REQUESTS.encode(msg))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise ControllerUnreachable(
                f"the controller did not answer within {timeout:g}s on {socket_path} (not running or stuck?)"
            )
        data = sock.recv()
        try:
            return CLI_REPLIES.decode_untrusted(data)
        except DecodeError as exc:
            raise ControllerUnreachable(f"unreadable reply from the controller: {exc}") from None
    finally:
        sock.close(linger=0)
        ctx.term()


# ---- output ------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return printable(value)
    return value


def status_json(reply: Any) -> str:
    return json.dumps(_plain(reply), indent=2, sort_keys=False)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _reality(counters: dict[str, int]) -> str:
    """A REALITY listener's line: senders passed, refused by reason, relay flows (docs/protocol.md)."""
    if not any(k.startswith(("reality_", "relay_")) for k in counters):
        return ""
    refused = {k[len("reality_refused_"):]: v for k, v in counters.items() if k.startswith("reality_refused_") and v}
    parts = [f"passed {counters.get('reality_passed', 0)}",
             "refused " + (", ".join(f"{printable(k)} {v}" for k, v in sorted(refused.items())) or "none"),
             f"relayed flows {counters.get('relay_flows', 0)} (open {counters.get('relay_flows_open', 0)}, "
             f"up {counters.get('relay_up_packets', 0)} / down {counters.get('relay_down_packets', 0)} packets)"]
    lost = {k: v for k, v in counters.items() if k in ("relay_full", "relay_rate_up", "relay_rate_down",
                                                         "relay_socket_error", "reality_resolve_failures") and v}
    if lost:
        parts.append("not relayed: " + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())))
    return "; ".join(parts)


def _traffic(counters: dict[str, int]) -> str:
    rx_p, tx_p = counters.get("dgram_rx_packets", 0), counters.get("tun_rx_packets", 0)
    rx_b, tx_b = counters.get("dgram_rx_bytes", 0), counters.get("tun_rx_bytes", 0)
    return f"{_bytes(rx_b)} received ({rx_p} packets), {_bytes(tx_b)} sent ({tx_p} packets)"


def _mtu(n: Any) -> str:
    """`1412 (auto: path MTU 1500 toward ...)`; the interface's MTU too when the session runs at less."""
    parts = []
    if n.interface_mtu and n.interface_mtu != n.mtu:
        parts.append(f"negotiated; interface {n.interface_mtu}")
    if n.mtu_source and n.mtu_source != "config":
        parts.append(f"{printable(n.mtu_source)}: {printable(n.mtu_note)}" if n.mtu_note else printable(n.mtu_source))
    return f"{n.mtu}" + (f" ({'; '.join(parts)})" if parts else "")


def _offloads(counters: dict[str, int]) -> str:
    """The TUN offloads line (docs/worker.md, "TUN offloads"): how many queues have them, what they did, and
    where the kernel refused super-packets left to its checksum check. "" when no worker reported them."""
    if "tun_offload" not in counters:
        return ""
    on = counters["tun_offload"]
    if not on:
        return "off"
    parts = [f"on for {on} queue{'s' * (on != 1)}",
             f"{counters.get('tun_gro_writes', 0)} coalesced writes ({counters.get('tun_gro_merged', 0)} packets)"]
    if counters.get("tun_gso_split"):
        parts.append(f"{counters['tun_gso_split']} super-packets split ({counters.get('tun_gso_segments', 0)} packets)")
    fallback = counters.get("tun_gro_fallback", 0)
    if fallback:
        parts.append(f"the kernel refused unflagged super-packets on {fallback} queue{'s' * (fallback != 1)}: "
                     "checksums verified by the worker there")
    return "; ".join(parts)


def format_status(reply: Any, *, verbose: bool = False) -> str:
    """A `wg show`-like text view of a StatusReply.

    Every text field is shown through `printable`: errors may quote a peer,
    and a terminal must never receive its control characters.
    """
    p = printable
    lines = [f"controller: pid {reply.controller_pid}, node {p(reply.node_id)}, up {reply.uptime:.0f}s"]
    if not reply.networks:
        lines.append("no networks configured")
    for n in reply.networks:
        lines.append("")
        lines.append(f"network: {p(n.name)}")
        lines.append(f"  state: {n.state.value}")
        lines.append(f"  interface: {p(n.interface)}")
        peer = f"{p(n.peer)}:{n.port}" if n.peer else f"port {n.port}"
        lines.append(f"  role: {n.role.value}, underlay peer: {peer}")
        lines.append(f"  udp ports: {n.ports}, " + (f"{n.port} for every queue" if n.ports == "shared"
                                                     else f"{n.port} + queue index"))
        lines.append(f"  tunnel: {', '.join(n.addresses)} -> {', '.join(n.peer_addresses)}")
        lines.append(f"  mtu: {_mtu(n)}")
        lines.append(f"  rtt: {n.rtt_ms:.1f} ms")
        lines.append(f"  transfer: {_traffic(n.counters)}")
        offloads = _offloads(n.counters)
        if offloads:
            lines.append(f"  tun offloads: {offloads}")
        if n.paths:
            lines.append(f"  path: {', '.join(p(a) for a in n.paths)}")
        if n.counters.get("path_migrations"):
            lines.append(f"  path migrations: {n.counters['path_migrations']} (the peer moved; see its address per queue, -v)")
        if n.counters.get("renewals") or n.counters.get("renew_failures"):
            lines.append(f"  renewals: {n.counters.get('renewals', 0)}, failed {n.counters.get('renew_failures', 0)}"
                         " (sessions moved to a new connection without a gap: keys rotated)")
        if n.peer_keys or n.local_key:
            lines.append(f"  peer key: {', '.join(p(k) for k in n.peer_keys) or '-'}, our key: {p(n.local_key) or '-'}")
        drops = ", ".join(f"{p(k)} {v}" for k, v in n.drops.items() if v) or "none"
        lines.append(f"  drops: {drops}")
        reality = _reality(n.counters)
        if reality:
            lines.append(f"  reality: {reality}")
        lines.append(f"  routes: {', '.join(n.routes) or 'none'}")
        lines.append(f"  restarts: {n.restarts}")
        if n.last_error:
            lines.append(f"  last error: {p(n.last_error)}")
        if verbose:
            for q in n.queues:
                lines.append(
                    f"  queue {q.queue}: pid {q.pid or '-'}, {q.state.value}, peer {p(q.peer) or '-'},"
                    f" rtt {q.rtt_ms:.1f} ms, mtu {q.mtu}, restarts {q.restarts}, sessions {q.sessions},"
                    f" depth {q.queue_depth},"
                    f" lost {q.seq_lost}, key updates {q.key_updates}"
                    + (f", peer key {p(q.peer_key)}" if q.peer_key else "")
                )
                lines.append(f"    transfer: {_traffic(q.counters)}")
                qdrops = ", ".join(f"{p(k)} {v}" for k, v in q.drops.items() if v)
                if qdrops:
                    lines.append(f"    drops: {qdrops}")
                if q.last_error:
                    lines.append(f"    last error: {p(q.last_error)}")
    return "\n".join(lines)


# ---- commands ------------------------------------------------------------------


class UsageError(Exception):
    """Bad command line (exit status 2)."""


def configured_runtime_dir(config_path: str, *, required: bool = False) -> str | None:
    """``[controller] runtime_dir`` from the configuration file, if it can be read.

    Only that one key is read (not the whole validation), so a file that is
    being edited still tells where the controller is. A file without an
    absolute runtime_dir gives the default. Returns None when the file cannot
    be read (an operator outside the l3ptp group usually cannot read
    /etc/l3ptp); with `required`, that raises `UsageError` instead.
    """
    try:
        with open(config_path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        if required:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot read {config_path}: {reason}") from None
        return None
    section = data.get("controller")
    value = section.get("runtime_dir") if isinstance(section, dict) else None
    if isinstance(value, str) and value.startswith("/") and "\0" not in value:
        return value
    return RUNTIME_DIR_DEFAULT  # not set: the controller uses the default too


def runtime_dir(args: argparse.Namespace) -> str:
    """--runtime-dir, else the configuration's runtime_dir, else the default."""
    if args.runtime_dir:
        return str(args.runtime_dir)
    explicit = args.config is not None
    found = configured_runtime_dir(args.config if explicit else CONFIG_DEFAULT, required=explicit)
    return found or RUNTIME_DIR_DEFAULT


def _socket_path(args: argparse.Namespace) -> str:
    return args.socket or os.path.join(runtime_dir(args), CONTROL_SOCKET)


def _result(reply: Any, out: TextIO, err: TextIO) -> int:
    from l3ptp.ipc.control_messages import CommandFailed, CommandResult

    if isinstance(reply, CommandFailed):
        print(f"l3ptp: {printable(reply.reason)} ({reply.code.name})", file=err)
        return EXIT_FAILED
    if isinstance(reply, CommandResult):
        print(printable(reply.message), file=out if reply.ok else err)
        for error in reply.errors:
            print(f"  {printable(error)}", file=err)
        return EXIT_OK if reply.ok else EXIT_FAILED
    print(f"l3ptp: unexpected reply {type(reply).__name__}", file=err)
    return EXIT_FAILED


def _cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from l3ptp.ipc.control_messages import StatusReply, StatusRequest

    reply = request(_socket_path(args), StatusRequest(verbose=args.verbose or args.json), timeout=args.timeout)
    if not isinstance(reply, StatusReply):
        return _result(reply, out, err)
    print(status_json(reply) if args.json else format_status(reply, verbose=args.verbose), file=out)
    return EXIT_OK


def _cmd_up_down(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from l3ptp.ipc.control_messages import DownRequest, UpRequest
    from l3ptp.ipc.errors import SchemaError

    try:
        msg = UpRequest(name=args.name) if args.command == "up" else DownRequest(name=args.name)
    except SchemaError:
        print(f"l3ptp: {args.name!r} is not a valid network name", file=err)
        return EXIT_USAGE
    return _result(request(_socket_path(args), msg, timeout=args.timeout), out, err)


def _cmd_reload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from l3ptp.ipc.control_messages import ReloadRequest

    return _result(request(_socket_path(args), ReloadRequest(), timeout=args.timeout), out, err)


def _cmd_keygen(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        from l3ptp.worker import keys
    except ImportError as exc:
        print(f"l3ptp keygen: key support is not installed (l3ptp.worker.keys: {exc})", file=err)
        return EXIT_FAILED
    key = keys.generate_reality_key() if args.reality else keys.generate_private_key()
    if args.out:
        if os.path.exists(args.out):
            print(f"l3ptp keygen: {args.out} exists; not overwriting it", file=err)
            return EXIT_FAILED
        try:
            keys.save_private_key(key, args.out)
        except OSError as exc:
            print(f"l3ptp keygen: cannot write {args.out}: {exc.strerror or exc}", file=err)
            return EXIT_FAILED
        print(f"private key written to {args.out}", file=err)
    else:
        print(f"no --out given: only the {'public key' if args.reality else 'fingerprint'} is shown, "
              "the key is discarded", file=err)
    if args.reality:  # what the connector's [networks.<name>.reality] public_key takes
        print(keys.reality_public_key(key), file=out)  # type: ignore[arg-type]
    else:
        print(keys.fingerprint(key), file=out)  # type: ignore[arg-type]
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l3ptp", description="Operate the l3ptp controller.")
    parser.add_argument(
        "--runtime-dir",
        help=f"controller runtime directory (default: runtime_dir of --config if readable, else {RUNTIME_DIR_DEFAULT})",
    )
    parser.add_argument("--config", help=f"configuration file to take runtime_dir from (default {CONFIG_DEFAULT})")
    parser.add_argument("--socket", help="controller CLI socket (default <runtime-dir>/control.sock)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for a reply")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="show networks, peers and counters", description="Show the tunnel status.")
    p.add_argument("-v", "--verbose", action="store_true", help="also show every queue")
    p.add_argument("--json", action="store_true", help="machine-readable output (includes queues)")
    p.set_defaults(func=_cmd_status)
    for name, text in (("up", "bring a configured network up"), ("down", "take a network down")):
        p = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        p.add_argument("name", metavar="NAME", help="network name from the configuration")
        p.set_defaults(func=_cmd_up_down)
    p = sub.add_parser("reload", help="re-read the configuration", description="Apply configuration changes.")
    p.set_defaults(func=_cmd_reload)
    p = sub.add_parser("keygen", help="generate a node key", description="Generate an Ed25519 node key "
                       "(or, with --reality, a listener's X25519 REALITY key).")
    p.add_argument("--out", help="write the private key here (mode 0600); prints the fingerprint "
                                 "(with --reality: the public key)")
    p.add_argument("--reality", action="store_true",
                   help="a REALITY key for a listener's [networks.<name>.reality] private_key_file")
    p.set_defaults(func=_cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, out, err))
    except ControllerUnreachable as exc:
        print(f"l3ptp: {exc}", file=err)
        return EXIT_UNREACHABLE
    except UsageError as exc:
        print(f"l3ptp: {exc}", file=err)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
