"""One UDP port per network: the SK_REUSEPORT eBPF program that steers each datagram to its queue's worker.

A shell of the helper (issue 18 item 2; docs/helper.md, "Shared port"). The workers of a listening network bind
one UDP port with SO_REUSEPORT (one reuseport group; the kernel admits only sockets of the same effective uid).
For each such network the helper holds a REUSEPORT_SOCKARRAY map keyed by queue and a program that reads the
first byte of the QUIC destination connection ID (short header: byte 1; long header: byte 6) and selects
`map[dcid[0] % queues]`. Each worker issues only connection IDs with `cid[0] % queues == queue`
(worker/steering.py), so every flow reaches the worker that owns its connection. A datagram too short to carry
that byte, or for a queue with no socket in the map (its worker is restarting), is dropped by the program
(SK_DROP): never handed to another queue's worker by the kernel's hash.

The program is ~25 instructions, assembled here and loaded with the raw bpf(2) syscall (ctypes, no library); the
helper never parses a datagram itself. Loading needs CAP_BPF and CAP_NET_ADMIN. A classic BPF program
(SO_ATTACH_REUSEPORT_CBPF) is not used: it returns an index into the group, and indices move when a socket
leaves, so a restarting worker would swap two queues' traffic; the map is keyed by queue.

Lifetime: the map and program fds live in the helper (`Steering`), made when the network is created
(CreateNetwork with `steer`); the program attached to the group holds its map, so steering goes on while the
helper is down. The controller keeps a copy of the map fd (NetworkCreated carries it) and gives it to a
restarted helper with its next CreateNetwork(adopt): that helper loads its own program against the same map
(`Steering.create` with the kept fd, after checking that it is a steering map of the network's size), and as
the running workers register again (the controller asks them to) each attach of the new program replaces the
old one for the group atomically, with every socket still in the map: no datagram is refused while the
steering changes hands. Only when no kept map came (the helper and the controller were down at once) does a
restarted helper build a new map: the first attach of its program then frees the old map, and until each
queue's worker has registered again its datagrams are refused (SK_DROP: the kernel answers ICMP port
unreachable, which the peer takes as a dead peer and reconnects); the controller has every worker it adopts
register again, so that none is left out of the new map. Closing the fds (DestroyNetwork) frees both once
the workers' sockets are gone: nothing is pinned, nothing is left behind. Neither bpffs (not mounted in every
container) nor systemd's fd store (not there outside systemd) is needed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import platform
import socket
import struct
import time

from l3ptp.ipc.constants import STEERING_RELEASE_WAIT

__all__ = ["SteeringUnavailable", "Steering", "check_map", "program"]

_NR_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_OBJ_GET_INFO_BY_FD = 0, 1, 2, 5, 15
MAP_REUSEPORT_SOCKARRAY, PROG_SK_REUSEPORT, ATTACH_SK_REUSEPORT_SELECT = 20, 21, 39
SO_ATTACH_REUSEPORT_EBPF, SO_COOKIE = 52, 57
#: The map's name (seen in `bpftool map`); a kept map must carry it. Values are 8 bytes: a lookup then gives
#: the socket's cookie, so a registration can see that its socket is already in place.
MAP_NAME, VALUE_SIZE = b"l3ptp_steer", 8
_ATTR_SIZE = 128
FALLBACK = 'underlay.ports = "per-queue"'


class SteeringUnavailable(OSError):
    """The kernel refused the map or the program (no CAP_BPF, an old kernel, ...)."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(map_fd: int, queues: int) -> bytes:
    """The steering program: `sk_select_reuseport(map, dcid[0] % queues)`, SK_DROP when that fails."""
    return b"".join([
        _insn(0xbf, 6, 1),                  # r6 = ctx
        _insn(0xbf, 1, 6),                  # r1 = ctx
        _insn(0xb7, 2, imm=8),              # r2 = 8: past the UDP header
        _insn(0xbf, 3, 10),                 # r3 = fp
        _insn(0x07, 3, imm=-8),             # r3 -= 8
        _insn(0xb7, 4, imm=7),              # r4 = 7 bytes: flags, version (4), DCID length, DCID[0]
        _insn(0x85, imm=26),                # r0 = skb_load_bytes(ctx, 8, fp - 8, 7)
        _insn(0x55, 0, off=15, imm=0),      # if r0 != 0 goto drop (shorter than 7 bytes)
        _insn(0x71, 2, 10, -8),             # r2 = byte 0
        _insn(0x54, 2, imm=0x80),           # r2 &= 0x80: the long-header bit
        _insn(0x15, 2, off=2, imm=0),       # if r2 == 0 goto short
        _insn(0x71, 2, 10, -2),             # long: r2 = byte 6 (DCID[0])
        _insn(0x05, off=1),                 # goto key
        _insn(0x71, 2, 10, -7),             # short: r2 = byte 1 (DCID[0])
        _insn(0x97, 2, imm=queues),         # key: r2 %= queues
        _insn(0x63, 10, 2, -16),            # *(u32 *)(fp - 16) = r2
        _insn(0xbf, 1, 6),                  # r1 = ctx
        _insn(0x18, 2, 1, imm=map_fd), _insn(0),  # r2 = map (ld_imm64, pseudo map fd)
        _insn(0xbf, 3, 10),                 # r3 = fp
        _insn(0x07, 3, imm=-16),            # r3 = &key
        _insn(0xb7, 4, imm=0),              # r4 = flags 0
        _insn(0x85, imm=82),                # r0 = sk_select_reuseport(ctx, map, &key, 0)
        _insn(0x55, 0, off=2, imm=0),       # if r0 != 0 goto drop (no socket for that queue)
        _insn(0xb7, 0, imm=1),              # r0 = SK_PASS (with the selected socket)
        _insn(0x95),                        # exit
        _insn(0xb7, 0, imm=0),              # drop: r0 = SK_DROP
        _insn(0x95),                        # exit
    ])


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise SteeringUnavailable(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    r = _libc.syscall(nr, cmd, buf, _ATTR_SIZE)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def _load(queues: int, map_fd: int | None = None) -> tuple[int, int]:
    """(map fd, program fd) for a network of `queues` queues, the map new or `map_fd` (then a dup of it: the
    caller keeps its own); SteeringUnavailable if the kernel refuses."""
    if map_fd is None:
        try:
            map_fd = _bpf(BPF_MAP_CREATE, struct.pack("<IIIIIII16s", MAP_REUSEPORT_SOCKARRAY, 4, VALUE_SIZE, queues,
                                                      0, 0, 0, MAP_NAME))
        except OSError as exc:
            raise SteeringUnavailable(exc.errno, f"cannot create the steering map: {exc.strerror}; the helper needs "
                                      f"CAP_BPF and CAP_NET_ADMIN (kernel 5.8+), or set {FALLBACK}") from None
    else:
        map_fd = os.dup(map_fd)
    code = program(map_fd, queues)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQII16sII", PROG_SK_REUSEPORT, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"l3ptp_steer", 0,
                       ATTACH_SK_REUSEPORT_SELECT)
    try:
        prog_fd = _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        os.close(map_fd)
        detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise SteeringUnavailable(exc.errno, f"cannot load the steering program: {exc.strerror} {detail[0]}; "
                                  f"the helper needs CAP_BPF and CAP_NET_ADMIN, or set {FALLBACK}") from None
    return map_fd, prog_fd


def check_map(fd: int, queues: int) -> str | None:
    """Why `fd` is not a steering map for `queues` queues (None: it is one). Reads only the kernel's own
    description of the object (BPF_OBJ_GET_INFO_BY_FD); any fd the caller passes is safe to ask about."""
    info = ctypes.create_string_buffer(40)
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    except OSError as exc:
        return f"not a BPF object ({exc.strerror})"
    kind, _id, key, value, entries, _flags, name = struct.unpack("<IIIIII16s", info.raw)
    want = (MAP_REUSEPORT_SOCKARRAY, 4, VALUE_SIZE, queues, MAP_NAME)
    got = (kind, key, value, entries, name.rstrip(b"\0"))
    if got != want:
        return f"not a steering map of {queues} queues (type {kind}, key {key}, value {value}, entries {entries})"
    return None


def _cookie(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    finally:
        sock.detach()


def _slot(map_fd: int, queue: int) -> int | None:
    """The cookie of the socket at `queue` in the map, None if the slot is empty."""
    key, value = ctypes.c_uint32(queue), ctypes.c_uint64(0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return int(value.value)


@dataclasses.dataclass(slots=True)
class _Group:
    queues: int
    map_fd: int
    prog_fd: int


def _attach(fd: int, prog_fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", prog_fd))
    finally:
        sock.detach()


class Steering:
    """The helper's steering maps and programs, one per network with a shared port."""

    def __init__(self, load=_load, clock=time.monotonic, sleep=time.sleep) -> None:  # type: ignore[no-untyped-def]
        self._load, self._clock, self._sleep = load, clock, sleep
        self.groups: dict[str, _Group] = {}

    def create(self, network: str, queues: int, kept: int | None = None) -> tuple[int, str]:
        """`network`'s map and program, made now if it has none of `queues` queues: on the map `kept` (an fd
        the controller kept from an earlier helper, see the module doc) when that is a steering map of the
        right size, else a new one. Returns (the map fd, which the caller may pass on but not close; how it
        came: "kept", "adopted" or "new"). SteeringUnavailable when the kernel refuses."""
        g = self.groups.get(network)
        if g is not None and g.queues == queues:
            return g.map_fd, "kept"
        self.drop(network)
        how = "new"
        if kept is not None:
            why = check_map(kept, queues)
            how = f"new (the kept map was refused: {why})" if why else "adopted"
            kept = kept if why is None else None
        map_fd, prog_fd = self._load(queues, kept)
        self.groups[network] = _Group(queues, map_fd, prog_fd)
        return map_fd, how

    def register(self, network: str, queues: int, queue: int, fd: int) -> None:
        """Steer `network`'s port: its program attached to the group of the SO_REUSEPORT UDP socket `fd` (every
        time: a group whose sockets all closed, all workers restarted, is a new group), then `fd` in the map at
        `queue` unless it is there already (an adopted map: the program's attach replaced the old one with
        every socket still in place). A socket still in an older helper's lost map cannot join ours (EBUSY)
        until that map is freed, which our program's attach sets off (it replaces the old program, the map's
        last holder): retried for at most STEERING_RELEASE_WAIT seconds (about 25 ms measured)."""
        g = self.groups.get(network)
        if g is None or g.queues != queues:
            self.create(network, queues)
            g = self.groups[network]
        _attach(fd, g.prog_fd)
        if _slot(g.map_fd, queue) == _cookie(fd):
            return
        key, value = ctypes.c_uint32(queue), ctypes.c_uint64(fd)
        attr = struct.pack("<IIQQQ", g.map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
        deadline = self._clock() + STEERING_RELEASE_WAIT
        while True:
            try:
                _bpf(BPF_MAP_UPDATE_ELEM, attr)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or self._clock() > deadline:
                    raise
            self._sleep(0.002)

    def drop(self, network: str) -> None:
        """Close the network's map and program (DestroyNetwork): the kernel frees them with the last socket."""
        g = self.groups.pop(network, None)
        if g is not None:
            os.close(g.prog_fd)
            os.close(g.map_fd)

    def close(self) -> None:
        for name in list(self.groups):
            self.drop(name)
