"""A handshake flooder: QUIC-Initial-looking datagrams from many source ports.

Modes:

* ``junk``: long-header Initial packets (QUIC v1, random CIDs, 1200 bytes)
  whose payload is random bytes: every one looks like a new connection
  attempt and fails only at decryption;
* ``noise``: small short-header datagrams, nothing like a connection attempt
  (the baseline: what merely receiving and dropping costs);
* ``replay``: real client Initials (one TLS ClientHello each, made by
  aioquic), replayed round-robin: every one can start a TLS handshake.

`flood` runs in the caller's thread until `seconds` have passed (a bounded
load) and returns how many datagrams it sent and in how many seconds. As a script (for a network
namespace)::

    python -m tests.support.flood HOST PORT --mode junk --ports 256 --seconds 5 [--bind ADDR] [--rate R]

prints one JSON line ``{"sent": N, "seconds": S, "rate": R}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

_INITIAL_SIZE = 1200


def junk_initial() -> bytes:
    dcid, scid = os.urandom(8), os.urandom(8)
    head = b"\xc3\x00\x00\x00\x01" + bytes([8]) + dcid + bytes([8]) + scid + b"\x00"
    rest = _INITIAL_SIZE - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def real_initials(count: int, server: tuple[str, int]) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from l3ptp.ipc.constants import ALPN

    out = []
    for _ in range(count):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="l3ptp")
        conn = QuicConnection(configuration=cfg)
        conn.connect(server, now=0.0)
        out.append(conn.datagrams_to_send(now=0.0)[0][0])
    return out


def flood(host: str, port: int, *, mode: str = "junk", ports: int = 256, seconds: float = 5.0,
          bind: str = "", templates: int = 64, rate: float = 0.0) -> tuple[int, float]:
    """Flood for `seconds`; `rate` > 0 paces the attempts to that many datagrams per second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(ports):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((bind, 0))
            s.setblocking(False)
            socks.append(s)
        if mode == "junk":
            packets = [junk_initial() for _ in range(templates)]
        elif mode == "noise":  # not QUIC at all (short header, small): the cheapest thing to drop
            packets = [b"\x40" + os.urandom(99) for _ in range(templates)]
        else:
            packets = real_initials(templates, (host, port))
        target = (host, port)
        sent = 0
        start = time.monotonic()
        deadline = start + seconds
        n_socks, n_packets = len(socks), len(packets)
        i = 0
        while True:
            for _ in range(256):
                try:
                    socks[i % n_socks].sendto(packets[i % n_packets], target)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError, InterruptedError):
                    pass
                i += 1
            now = time.monotonic()
            if now >= deadline:
                return sent, now - start
            if rate > 0 and (ahead := start + i / rate - now) > 0:
                time.sleep(min(ahead, deadline - now))
    finally:
        for s in socks:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--mode", choices=("junk", "replay", "noise"), default="junk")
    ap.add_argument("--ports", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bind", default="")
    ap.add_argument("--rate", type=float, default=0.0, help="datagrams per second (default: as fast as it can)")
    args = ap.parse_args(argv)
    sent, took = flood(args.host, args.port, mode=args.mode, ports=args.ports, seconds=args.seconds, bind=args.bind,
                       rate=args.rate)
    print(json.dumps({"sent": sent, "seconds": round(took, 3), "rate": round(sent / took)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
