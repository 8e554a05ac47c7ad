"""TUN offloads end to end (docs/worker.md, "TUN offloads"): real IFF_VNET_HDR devices in two namespaces.

With `offload = "auto"` the sender's worker reads TSO super-packets and splits them, the
receiver's worker coalesces what it writes (with `"gro"` only the latter), and a byte stream with a known
digest arrives intact in both directions and both IP families. One end with `offload = "off"` interoperates with one with it on (no
negotiation: the wire is the same). A restarted helper adopts the device in its recorded mode.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

from lab.hosts import Host, Lab
from tests.privileged.test_e2e import IFNAME, _lab, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PORT = 5301
SIZE = 24 * 1024 * 1024

# The receiver: accept one connection, read to EOF, print the byte count and SHA-256.
SINK = """
import hashlib, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(30)
c, _ = s.accept()
c.settimeout(30)
h, n = hashlib.sha256(), 0
while data := c.recv(1 << 20):
    h.update(data)
    n += len(data)
print(n, h.hexdigest())
"""
# The sender: a deterministic pseudo-random stream (SHA-256 in counter mode), in large writes (TSO).
SOURCE = """
import hashlib, socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        break
    except OSError:
        time.sleep(0.1)
size = int(sys.argv[3])
block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(8192))
sent = 0
while sent < size:
    chunk = block[: size - sent]
    c.sendall(chunk)
    sent += len(chunk)
c.close()
"""


def expected_digest(size: int) -> str:
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(8192))
    h, left = hashlib.sha256(), size
    while left:
        h.update(block[:left])
        left -= min(left, len(block))
    return h.hexdigest()


def transfer(lab: Lab, src: Host, dst: Host, address: str, size: int = SIZE) -> None:
    """Send `size` bytes from `src` to `dst` at `address` across the tunnel over TCP; assert they arrived intact."""
    sink = lab.popen(dst, [lab.python, "-c", SINK, address, str(PORT)])
    try:
        lab.run(src, [lab.python, "-c", SOURCE, address, str(PORT), str(size)], timeout=60)
        out, err = sink.communicate(timeout=40)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate(timeout=5)
    assert sink.returncode == 0, err
    assert out.split() == [str(size), expected_digest(size)]


def counters(lab: Lab, host: Host) -> dict[str, int]:
    return lab.network(host)["counters"]


def settled(lab: Lab, host: Host, key: str, at_least: int) -> dict[str, int]:
    """The counters once `key` reached `at_least` (workers report every status_interval)."""
    wait_for(f"{key} >= {at_least} on host {host.name}", lambda: counters(lab, host).get(key, 0) >= at_least,
             timeout=10, lab=lab)
    return counters(lab, host)


def vnet_hdr(lab: Lab, host: Host) -> bool:
    """Does the device have IFF_VNET_HDR, as the kernel reports it (and is that recorded in its ifalias)?"""
    out = lab.run(host, ["ip", "-d", "link", "show", IFNAME]).stdout
    assert ("vnet_hdr on" in out) == out.rstrip().endswith(":vnet"), out
    return "vnet_hdr on" in out


ON = {"offload": "auto"}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from _lab(queues=1, config_a=ON, config_b=ON)


def test_super_packets_are_split_and_writes_coalesced_both_ways_both_families(lab: Lab) -> None:
    assert vnet_hdr(lab, lab.a) and vnet_hdr(lab, lab.b)
    before_a, before_b = counters(lab, lab.a), counters(lab, lab.b)
    assert before_a["tun_offload"] == before_b["tun_offload"] == 1
    transfer(lab, lab.a, lab.b, lab.b.overlay4)
    transfer(lab, lab.b, lab.a, lab.a.overlay6)
    a = settled(lab, lab.a, "tun_gro_writes", before_a["tun_gro_writes"] + 1)
    b = settled(lab, lab.b, "tun_gro_writes", before_b["tun_gro_writes"] + 1)
    for now, before in ((a, before_a), (b, before_b)):
        assert now["tun_gso_split"] > before["tun_gso_split"]
        assert now["tun_gso_segments"] > 2 * (now["tun_gso_split"] - before["tun_gso_split"])
        assert now["tun_gro_merged"] > 2 * (now["tun_gro_writes"] - before["tun_gro_writes"])
    for host in (lab.a, lab.b):
        d = lab.network(host)["drops"]
        assert d["tun_bad_vnet"] == 0 and d["tun_oversize"] == 0, d
        assert "  tun offloads: on for 1 queue; " in lab.status_text(host)
    # iperf3 as the bench runs it, bounded in time.
    tcp = lab.iperf3(lab.a, lab.b, seconds=2)
    assert tcp["end"]["sum_received"]["bytes"] > 1_000_000


def test_one_end_without_offload_interoperates() -> None:
    """a: offload off (a plain TUN), b: on. No negotiation: both directions carry intact data."""
    for lab in _lab(queues=1, config_a={"offload": "off"}, config_b=ON):
        assert not vnet_hdr(lab, lab.a)
        assert vnet_hdr(lab, lab.b)
        transfer(lab, lab.a, lab.b, lab.b.overlay6, size=8 * 1024 * 1024)
        transfer(lab, lab.b, lab.a, lab.a.overlay4, size=8 * 1024 * 1024)
        b = settled(lab, lab.b, "tun_gso_split", 1)
        a = counters(lab, lab.a)
        assert a["tun_offload"] == 0 and a["tun_gso_split"] == a["tun_gro_writes"] == 0
        assert b["tun_offload"] == 1 and b["tun_gro_writes"] > 0


def test_gro_only_coalesces_writes_and_reads_plain_packets() -> None:
    """a: offload = "gro" (writes coalesced, no TSO asked for), b: off. Both directions intact; a splits
    nothing (the kernel segments what it hands over) and coalesces what it delivers."""
    for lab in _lab(queues=1, config_a={"offload": "gro"}, config_b={"offload": "off"}):
        assert vnet_hdr(lab, lab.a) and not vnet_hdr(lab, lab.b)
        transfer(lab, lab.b, lab.a, lab.a.overlay4, size=8 * 1024 * 1024)
        transfer(lab, lab.a, lab.b, lab.b.overlay6, size=8 * 1024 * 1024)
        transfer(lab, lab.b, lab.a, lab.a.overlay6, size=8 * 1024 * 1024)
        a = settled(lab, lab.a, "tun_gro_writes", 1)
        assert a["tun_offload"] == 1 and a["tun_gso_split"] == 0
        assert a["tun_gro_merged"] > 2 * a["tun_gro_writes"]
        assert lab.network(lab.a)["drops"]["tun_bad_vnet"] == 0


def test_restarted_helper_adopts_the_device_in_its_mode() -> None:
    for lab in _lab(queues=1, config_a=ON, config_b=ON):
        old_workers = lab.pids(lab.a)["workers"]
        os.kill(lab.a.procs["helper"].pid, signal.SIGKILL)
        lab.a.procs["helper"].wait(10)
        lab.start_helper(lab.a)
        time.sleep(3)  # the controller probes the helper every 2 s
        assert lab.pids(lab.a)["workers"] == old_workers
        # A new worker gets an adopted queue: still a virtio_net_hdr device, offloads on, data intact.
        os.kill(old_workers[0], signal.SIGKILL)
        wait_for("the worker respawned", lambda: lab.pids(lab.a)["workers"] not in ([], old_workers), timeout=20,
                 lab=lab)
        lab.wait_established(40)
        assert vnet_hdr(lab, lab.a)
        transfer(lab, lab.a, lab.b, lab.b.overlay4, size=8 * 1024 * 1024)
        transfer(lab, lab.b, lab.a, lab.a.overlay4, size=8 * 1024 * 1024)
        a = settled(lab, lab.a, "tun_gro_writes", 1)
        assert a["tun_offload"] == 1 and a["tun_gso_split"] > 0


def _kernel_check(_: object = None) -> dict[str, list[int]]:
    """In a fresh namespace: a TUN with IFF_VNET_HDR at 198.19.0.2 and fd00::2; segments to a closed port,
    coalesced for a local destination (no NEEDS_CSUM, the checksum built from theirs), written as one
    super-packet, intact and with one payload byte changed. (RSTs read back, Tcp InCsumErrors added) each."""
    import fcntl
    import select
    import struct
    import subprocess

    from l3ptp.worker import gro
    from tests.unit.test_worker_offload import LOCAL, TIMESTAMPS, segments

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"l3pk0", 0x0001 | 0x1000 | 0x4000))  # TUN, NO_PI, VNET_HDR
    for cmd in (["ip", "link", "set", "l3pk0", "up", "mtu", "1280"],
                ["ip", "addr", "add", "198.19.0.2/24", "dev", "l3pk0"],
                ["ip", "addr", "add", "fd00::2/64", "dev", "l3pk0", "nodad"]):
        subprocess.run(cmd, check=True, timeout=10)

    def csum_errors() -> int:
        rows = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
        return int(dict(zip(rows[0][1:], rows[1][1:]))["InCsumErrors"])

    def drain() -> list[bytes]:
        out = []
        while select.select([fd], [], [], 0.3)[0]:
            try:
                out.append(os.read(fd, 70000))
            except BlockingIOError:
                break
        return out

    drain()
    result = {}
    for version in (4, 6):
        for case in ("good", "corrupted"):
            packets = [bytearray(p) for p in segments(version, os.urandom(4 * 1200), 1200, options=TIMESTAMPS)]
            if case == "corrupted":
                packets[2][-300] ^= 0x40
            ((buffers, carried),) = gro.coalesce([bytes(p) for p in packets], LOCAL[version])
            assert len(carried) == 4
            before = csum_errors()
            os.write(fd, b"".join(bytes(b) for b in buffers))
            iphl = 20 if version == 4 else 40
            rsts = [r for r in drain() if len(r) >= 10 + iphl + 20 and r[10 + iphl + 13] & 0x04]
            result[f"{case} IPv{version}"] = [len(rsts), csum_errors() - before]
    os.close(fd)
    return result


def test_the_kernel_verifies_a_super_packet_coalesced_for_its_own_address(netns: str) -> None:
    """What coalescing to a local address relies on: the kernel checks the complete checksum of a super-packet
    written without NEEDS_CSUM, takes it when intact (a closed port answers RST) and drops all of it,
    counted as InCsumErrors, when one segment was corrupted."""
    from lab.netns import run_as

    assert run_as(_kernel_check, netns=netns, prepare=lambda: None) == {
        "good IPv4": [1, 0], "corrupted IPv4": [0, 1], "good IPv6": [1, 0], "corrupted IPv6": [0, 1]}
