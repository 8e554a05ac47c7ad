"""``mtu = "auto"``: the tunnel MTU a network gets from its underlay path (issue 16).

Pure. The shell that asks the kernel for the path MTU is `pathmtu.py`.

Theory of operation. One QUIC packet of `max_datagram_size` bytes (the UDP
payload) must fit the underlay path without IP fragmentation, and one tunnel
packet of `mtu` bytes must fit one DATAGRAM of such a packet:

    max_datagram_size = path MTU - IP header (20 or 40) - UDP header (8)
    mtu               = datagram_budget(max_datagram_size)   (the same budget `rules.check_mtu` checks)

so a 1500-byte path gives 1412 over IPv4 and 1392 over IPv6. The result is
clamped to MTU_MAX (and `max_datagram_size` to MAX_DATAGRAM_SIZE_MAX or to an
explicit `max_datagram_size`, which caps it). A path too small to carry
MTU_DEFAULT (1280, the seed's default and the IPv6 minimum) falls back to
MTU_DEFAULT with MAX_DATAGRAM_SIZE_DEFAULT, as a network without `mtu` would
run, and says so (`source` "auto-fallback" in `l3ptp status`, a warning in the
log). Both ends still negotiate the smaller MTU (`accepted_mtu`), so an auto
end and a fixed end agree.
"""

from __future__ import annotations

import dataclasses

from l3ptp.controller.config import NetworkConfig
from l3ptp.ipc.constants import (
    IPV4_MIN_HEADER,
    IPV6_HEADER,
    MAX_DATAGRAM_SIZE_DEFAULT,
    MAX_DATAGRAM_SIZE_MAX,
    MAX_DATAGRAM_SIZE_MIN,
    MTU_DEFAULT,
    MTU_MAX,
    UDP_HEADER,
    datagram_budget,
)

__all__ = ["CONFIG", "AUTO", "FALLBACK", "MtuChoice", "apply", "derive", "fallback", "fixed", "keep_running",
           "max_datagram_size_for_path", "min_path_mtu", "underlay_overhead"]

#: Where a network's MTU came from (`NetworkStatus.mtu_source`).
CONFIG = "config"
AUTO = "auto"
FALLBACK = "auto-fallback"


@dataclasses.dataclass(frozen=True, slots=True)
class MtuChoice:
    """The MTU and QUIC packet size a network runs with, and why."""

    mtu: int
    max_datagram_size: int
    #: CONFIG, AUTO or FALLBACK.
    source: str
    #: The underlay path MTU it was derived from (0: none, or unknown).
    path_mtu: int = 0
    #: For the operator: what the path was and where it was measured, or why auto fell back.
    note: str = ""


def underlay_overhead(version: int) -> int:
    """IP + UDP header bytes in front of each QUIC packet on an IPv`version` underlay."""
    return (IPV6_HEADER if version == 6 else IPV4_MIN_HEADER) + UDP_HEADER


def max_datagram_size_for_path(path_mtu: int, version: int) -> int:
    """The largest QUIC packet (UDP payload) that crosses a path of `path_mtu` unfragmented."""
    return path_mtu - underlay_overhead(version)


def min_path_mtu(version: int) -> int:
    """The smallest path MTU whose DATAGRAM budget still carries MTU_DEFAULT."""
    per_packet = MAX_DATAGRAM_SIZE_MIN - datagram_budget(MAX_DATAGRAM_SIZE_MIN)  # QUIC overhead + L3PTP header
    return MTU_DEFAULT + per_packet + underlay_overhead(version)


def fixed(net: NetworkConfig) -> MtuChoice:
    """The choice of a network with an integer `mtu`: the configuration as it is."""
    return MtuChoice(net.mtu, net.max_datagram_size, CONFIG)


def fallback(reason: str, mds_cap: int = MAX_DATAGRAM_SIZE_MAX, path_mtu: int = 0) -> MtuChoice:
    """MTU_DEFAULT, as a network without `mtu` runs (within an explicit `max_datagram_size`)."""
    return MtuChoice(MTU_DEFAULT, min(mds_cap, MAX_DATAGRAM_SIZE_DEFAULT), FALLBACK, path_mtu, reason)


def derive(path_mtu: int, version: int, *, mds_cap: int = MAX_DATAGRAM_SIZE_MAX, where: str = "") -> MtuChoice:
    """The choice for a path of `path_mtu` bytes over an IPv`version` underlay (see the module text)."""
    mds = min(max_datagram_size_for_path(path_mtu, version), mds_cap, MAX_DATAGRAM_SIZE_MAX)
    mtu = min(datagram_budget(mds), MTU_MAX)
    text = f"path MTU {path_mtu}" + (f" {where}" if where else "")
    if mtu < MTU_DEFAULT:
        return fallback(f"{text} is below {min_path_mtu(version)}, the least that carries {MTU_DEFAULT}"
                        f" over IPv{version}: fell back to {MTU_DEFAULT}", mds_cap, path_mtu)
    return MtuChoice(mtu, mds, AUTO, path_mtu, text)


def keep_running(choice: MtuChoice, running_mtu: int) -> MtuChoice:
    """The choice for a network the helper still has (a controller restart) at `running_mtu`.

    The interface keeps its MTU (the helper adopts only an identical network),
    with a QUIC packet size whose budget carries it. Nothing changes if the
    path still gives the same MTU.
    """
    if choice.source == CONFIG or running_mtu == choice.mtu:
        return choice
    per_packet = MAX_DATAGRAM_SIZE_MIN - datagram_budget(MAX_DATAGRAM_SIZE_MIN)
    mds = min(max(choice.max_datagram_size, running_mtu + per_packet), MAX_DATAGRAM_SIZE_MAX)
    note = (f"kept {running_mtu} of the running interface; the path now gives {choice.mtu}"
            f" ({choice.note}); `l3ptp down` and `up` apply it")
    return MtuChoice(running_mtu, mds, choice.source, choice.path_mtu, note)


def apply(net: NetworkConfig, choice: MtuChoice) -> NetworkConfig:
    """`net` with the chosen MTU and QUIC packet size (what the helper and the workers get)."""
    return dataclasses.replace(net, mtu=choice.mtu, max_datagram_size=choice.max_datagram_size)
