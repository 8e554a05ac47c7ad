"""A camouflage scenario run inside a test's own network namespace (tests/privileged/test_camouflage.py):

a real HTTP/3 server (hypercorn, its own certificate) as the camouflage target, a listener made of
worker/reality_gate.py and worker/relay.py on a UDP socket, and a real HTTP/3 client (niquests over qh3)
as the prober; then a REALITY-sealed first flight, and a flood of unauthenticated senders.

    python -m tests.support.camouflage scenario WORKDIR ADDRESS   # prints one JSON object

and its parts for a whole-stack test (tests/privileged/test_reality_e2e.py):

    python tests/support/camouflage.py probe ADDRESS PORT   # one HTTP/3 GET; prints JSON
    python tests/support/camouflage.py flood ADDRESS PORT N # N senders, one unsealed Initial or junk each
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

TARGET_PORT, LISTEN_PORT = 8443, 443
APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"<html><body>the camouflage target's own page</body></html>"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


def make_cert(workdir: str) -> str:
    """A self-signed certificate for www.site.test; its SHA-256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.site.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.site.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    with open(os.path.join(workdir, "cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(workdir, "key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fetch(ip: str, port: int = LISTEN_PORT) -> dict[str, Any]:
    """GET https://ip:port/ over HTTP/3 only, as a browser-like client would after learning of h3."""
    import niquests

    with niquests.Session(disable_http1=True, disable_http2=True) as s:
        s.quic_cache_layer.add_domain(ip, port)
        r = s.get(f"https://{ip}:{port}/", verify=False, timeout=10)
        der = r.conn_info.certificate_der if r.conn_info else None
        return {"status": r.status_code, "body": r.text, "http_version": r.http_version,
                "fingerprint": hashlib.sha256(der).hexdigest() if der else None}


def sealed_flight(ip: str, public_key: bytes) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from l3ptp.worker.reality_engine import connect_sealed

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                                          server_name="www.site.test"))
    connect_sealed(conn, (ip, LISTEN_PORT), 0.0, public_key)
    return [d for d, _ in conn.datagrams_to_send(now=0.0)]


async def scenario(ip: str, fingerprint: str) -> dict[str, Any]:
    from l3ptp.worker import reality
    from l3ptp.worker.reality_gate import RealityGate, RelayTable
    from l3ptp.worker.relay import Camouflage, CamouflageRelay
    from tests.support.quic_initial import aioquic_client

    loop = asyncio.get_running_loop()
    cred = reality.Credential(os.urandom(32))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.bind((ip, LISTEN_PORT))
    relay = CamouflageRelay(loop, (ip, TARGET_PORT), lambda data, addr: sock.sendto(data, addr),
                            RelayTable(max_flows=64))
    cam = Camouflage(RealityGate(cred, camouflage=True, max_pending=32), relay)
    to_engine: list[tuple[Any, int]] = []

    def readable() -> None:
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            passed = cam.datagram(addr, data, loop.time(), time.time())
            if passed:
                to_engine.append((addr, len(passed)))

    loop.add_reader(sock.fileno(), readable)
    out: dict[str, Any] = {"target_fingerprint": fingerprint}
    try:
        out["probe"] = await asyncio.to_thread(fetch, ip)
        out["after_probe"] = cam.status()
        # Our peer: its sealed first flight goes to the engine, not to the target.
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((ip, 0))
        for d in sealed_flight(ip, cred.public_key):
            peer.sendto(d, (ip, LISTEN_PORT))
        await asyncio.sleep(0.3)
        out["peer_passed"] = [n for addr, n in to_engine if addr == peer.getsockname()]
        # A flood: 400 senders, half with real (unsealed) Initials, half with junk, within 2 s.
        plain = aioquic_client(["h3"], server_name="www.site.test")[1][0]
        senders = []
        for i in range(400):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.sendto(plain if i % 2 else os.urandom(1200), (ip, LISTEN_PORT))
            senders.append(s)
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        out["after_flood"] = cam.status()
        # Never an open proxy: every relay socket is connected to the configured target and nothing else.
        out["relay_peers"] = sorted({"%s:%d" % s.getpeername()[:2] for s in relay.socks.values()})
        # The peer still gets through, and a prober while the relay table is full is refused, not queued.
        peer2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer2.bind((ip, 0))
        for d in sealed_flight(ip, cred.public_key):
            peer2.sendto(d, (ip, LISTEN_PORT))
        await asyncio.sleep(0.3)
        out["peer2_passed"] = [n for addr, n in to_engine if addr == peer2.getsockname()]
        for s in [peer, peer2, *senders]:
            s.close()
    finally:
        loop.remove_reader(sock.fileno())
        relay.close()
        sock.close()
    out["final"] = cam.status()
    return out


def target_argv(workdir: str, ip: str, port: int) -> tuple[list[str], str]:
    """hypercorn's command line serving APP over HTTP/3 (and TLS over TCP) on ip:port with a new
    certificate written to `workdir`, and that certificate's fingerprint."""
    fingerprint = make_cert(workdir)
    with open(os.path.join(workdir, "app.py"), "w") as f:
        f.write(APP)
    return [sys.executable, "-m", "hypercorn", "--quic-bind", f"{ip}:{port}", "--bind", f"{ip}:{port}",
            "--certfile", os.path.join(workdir, "cert.pem"), "--keyfile", os.path.join(workdir, "key.pem"),
            os.path.join(workdir, "app.py") + ":app"], fingerprint


def start_target(workdir: str, ip: str, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """hypercorn (`target_argv`) started here; ready."""
    argv, fingerprint = target_argv(workdir, ip, port)
    server = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # hypercorn is ready once its TCP side accepts
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, fingerprint


def flood(ip: str, port: int, senders: int) -> None:
    """`senders` sockets, each sending one unsealed Initial or 1200 random bytes to ip:port."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"]))
    conn.connect((ip, port), now=0.0)
    plain = conn.datagrams_to_send(now=0.0)[0][0]
    socks = []
    for i in range(senders):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(plain if i % 2 else os.urandom(1200), (ip, port))
        socks.append(s)
        if i % 50 == 49:
            time.sleep(0.05)
    for s in socks:
        s.close()


def main() -> int:
    mode = sys.argv[1]
    if mode == "flood":
        flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    if mode == "probe":
        print(json.dumps(fetch(sys.argv[2], int(sys.argv[3]))))
        return 0
    workdir, ip = sys.argv[2], sys.argv[3]
    server, fingerprint = start_target(workdir, ip, TARGET_PORT)
    try:
        result = asyncio.run(scenario(ip, fingerprint))
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
