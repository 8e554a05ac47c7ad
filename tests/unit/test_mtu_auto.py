"""``mtu = "auto"`` (issue 16 item 3): configuration, derivation, choice per network (pure: no root)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from typing import Any

import pytest

from l3ptp.controller import mtu as mtus
from l3ptp.controller.config import ConfigError, parse_config
from l3ptp.controller.pathmtu import choose
from l3ptp.ipc.constants import (
    MAX_DATAGRAM_SIZE_DEFAULT,
    MAX_DATAGRAM_SIZE_MAX,
    MTU_DEFAULT,
    MTU_MAX,
    datagram_budget,
)
from tests.support.config_builders import config, lab, office, underlay

IP = ipaddress.ip_address


def net_of(**overrides: Any) -> Any:
    return parse_config(config({"office": office(**overrides)})).networks[0]


def errors_of(data: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


# -- configuration ---------------------------------------------------------------------


def test_auto_is_accepted_with_the_fallback_and_the_cap() -> None:
    net = net_of(mtu="auto")
    assert net.mtu_auto is True
    assert (net.mtu, net.max_datagram_size) == (MTU_DEFAULT, MAX_DATAGRAM_SIZE_MAX)


def test_integer_mtu_is_not_auto() -> None:
    net = net_of(mtu=1290)
    assert net.mtu_auto is False
    assert (net.mtu, net.max_datagram_size) == (1290, MAX_DATAGRAM_SIZE_DEFAULT)
    assert net_of().mtu_auto is False


def test_auto_keeps_an_explicit_max_datagram_size_as_the_cap() -> None:
    net = net_of(mtu="auto", max_datagram_size=1400)
    assert (net.mtu_auto, net.max_datagram_size) == (True, 1400)


@pytest.mark.parametrize("value", ["Auto", "AUTO", "automatic", "", "1400", "max"])
def test_other_strings_are_rejected_with_a_clear_error(value: str) -> None:
    assert errors_of(config({"office": office(mtu=value)})) == (
        f'networks.office.mtu: {value!r} is not a valid MTU: an integer 576..9000, or "auto"',
    )


def test_auto_with_a_cap_below_what_1280_needs_is_an_error() -> None:
    assert errors_of(config({"office": office(mtu="auto", max_datagram_size=1300)})) == (
        'networks.office.max_datagram_size: 1300 caps the QUIC packet size of mtu = "auto" at a DATAGRAM'
        f" budget of {datagram_budget(1300)}, below the fallback {MTU_DEFAULT}; raise it to at least"
        f" {MTU_DEFAULT + 1300 - datagram_budget(1300)} or leave it out",
    )


def test_auto_is_allowed_with_ipv6_tunnel_addresses() -> None:
    cfg = parse_config(config({"lab": lab(mtu="auto")}))
    assert cfg.networks[0].mtu_auto is True


# -- derivation (the arithmetic) -----------------------------------------------------------------


def test_1500_over_ipv4_gives_about_1400() -> None:
    c = mtus.derive(1500, 4)
    assert c == mtus.MtuChoice(1412, 1472, mtus.AUTO, 1500, "path MTU 1500")
    # The same budget the configuration checks: mtu fits max_datagram_size exactly.
    assert c.mtu == datagram_budget(c.max_datagram_size)


def test_1500_over_ipv6_gives_20_less() -> None:
    c = mtus.derive(1500, 6, where="toward fd00:18::1")
    assert (c.mtu, c.max_datagram_size, c.source) == (1392, 1452, mtus.AUTO)
    assert c.note == "path MTU 1500 toward fd00:18::1"


def test_underlay_overhead() -> None:
    assert mtus.underlay_overhead(4) == 28
    assert mtus.underlay_overhead(6) == 48
    assert mtus.max_datagram_size_for_path(1500, 4) == 1472


def test_jumbo_path_is_clamped_to_mtu_max() -> None:
    c = mtus.derive(9000, 4)
    assert (c.mtu, c.max_datagram_size) == (datagram_budget(8972), 8972)
    c = mtus.derive(65536, 4)  # loopback
    assert (c.mtu, c.max_datagram_size) == (MTU_MAX, MAX_DATAGRAM_SIZE_MAX)


def test_an_explicit_cap_limits_the_packet_size() -> None:
    c = mtus.derive(1500, 4, mds_cap=1400)
    assert (c.mtu, c.max_datagram_size, c.source) == (datagram_budget(1400), 1400, mtus.AUTO)


def test_the_smallest_path_that_carries_1280() -> None:
    for version in (4, 6):
        least = mtus.min_path_mtu(version)
        assert mtus.derive(least, version).mtu == MTU_DEFAULT
        assert mtus.derive(least, version).source == mtus.AUTO
        assert mtus.derive(least - 1, version).source == mtus.FALLBACK
    assert mtus.min_path_mtu(4) == 1368
    assert mtus.min_path_mtu(6) == 1388


@pytest.mark.parametrize("path", [1367, 1280, 576])
def test_a_path_below_1280s_needs_falls_back_to_the_default(path: int) -> None:
    c = mtus.derive(path, 4, where="toward 198.18.0.2")
    assert (c.mtu, c.max_datagram_size, c.source, c.path_mtu) == (MTU_DEFAULT, MAX_DATAGRAM_SIZE_DEFAULT,
                                                                  mtus.FALLBACK, path)
    assert c.note == (f"path MTU {path} toward 198.18.0.2 is below 1368, the least that carries 1280 over IPv4:"
                      " fell back to 1280")


def test_fixed_keeps_the_configuration() -> None:
    net = net_of(mtu=1290)
    assert mtus.fixed(net) == mtus.MtuChoice(1290, MAX_DATAGRAM_SIZE_DEFAULT, mtus.CONFIG)
    assert mtus.apply(net, mtus.fixed(net)) == net


def test_apply_sets_mtu_and_packet_size() -> None:
    net = mtus.apply(net_of(mtu="auto"), mtus.derive(1500, 4))
    assert (net.mtu, net.max_datagram_size, net.mtu_auto) == (1412, 1472, True)


def test_keep_running_keeps_the_interfaces_mtu() -> None:
    now = mtus.derive(1450, 4)
    kept = mtus.keep_running(now, 1412)
    assert (kept.mtu, kept.source) == (1412, mtus.AUTO)
    assert datagram_budget(kept.max_datagram_size) >= 1412
    assert "kept 1412" in kept.note
    assert mtus.keep_running(now, now.mtu) is now


# -- the choice of one network (fake probes) -------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Probe:
    def __init__(self, mtu: int | OSError) -> None:
        self.mtu, self.calls = mtu, []  # type: ignore[var-annotated]

    def __call__(self, peer: Any, port: int, local: Any) -> int:
        self.calls.append((peer, port, local))
        if isinstance(self.mtu, OSError):
            raise self.mtu
        return self.mtu


def test_choose_fixed_asks_nothing() -> None:
    probe = Probe(OSError("must not be called"))
    assert run(choose(net_of(mtu=1290), "l3-", probe=probe)).source == mtus.CONFIG
    assert probe.calls == []


def test_choose_probes_the_route_toward_the_peer() -> None:
    net = parse_config(config({"office": underlay(office(mtu="auto"), peer="198.18.0.2")})).networks[0]
    probe = Probe(1500)
    c = run(choose(net, "l3-", probe=probe))
    assert probe.calls == [(IP("198.18.0.2"), 4433, IP("198.18.0.1"))]
    assert (c.mtu, c.source, c.note) == (1412, mtus.AUTO, "path MTU 1500 toward 198.18.0.2")


def test_choose_resolves_a_peers_name() -> None:
    net = parse_config(config({"lab": lab(mtu="auto", underlay={"peer": "peer.example", "port": 4433})}))
    net = net.networks[0]

    async def resolve(host: str, port: int) -> list[Any]:
        assert (host, port) == ("peer.example", 4433)
        return [IP("fd00:18::7")]

    c = run(choose(net, "l3-", resolve=resolve, probe=Probe(1500)))
    assert (c.mtu, c.note) == (1392, "path MTU 1500 toward fd00:18::7")


def test_choose_falls_back_when_there_is_no_route_or_no_name() -> None:
    net = parse_config(config({"lab": lab(mtu="auto")})).networks[0]
    c = run(choose(net, "l3-", probe=Probe(OSError(101, "Network is unreachable"))))
    assert (c.mtu, c.max_datagram_size, c.source) == (MTU_DEFAULT, MAX_DATAGRAM_SIZE_DEFAULT, mtus.FALLBACK)
    assert c.note == "no path MTU toward 198.18.0.3 (Network is unreachable): fell back to the default"

    named = dataclasses.replace(net, underlay=dataclasses.replace(net.underlay, peer="nowhere.example"))

    async def fail(host: str, port: int) -> list[Any]:
        raise OSError("Name or service not known")

    c = run(choose(named, "l3-", resolve=fail, probe=Probe(1500)))
    assert c.source == mtus.FALLBACK and c.note.startswith("cannot resolve nowhere.example")


def test_choose_for_a_listener_without_peer_takes_the_largest_interface() -> None:
    net = net_of(mtu="auto")  # listen on 198.18.0.1, no underlay.peer
    seen = []

    def interfaces(prefix: str) -> int:
        seen.append(prefix)
        return 1500

    c = run(choose(net, "l3-", probe=Probe(OSError("no peer to probe")), interfaces=interfaces))
    assert seen == ["l3-"]
    assert (c.mtu, c.source) == (1412, mtus.AUTO)
    assert "listener without underlay.peer" in c.note
    c = run(choose(net, "l3-", interfaces=lambda prefix: 0))
    assert c.source == mtus.FALLBACK


# -- negotiation (the session's rule with the derived figures) ---------------------------------------


def test_negotiation_of_an_auto_end_with_a_1280_end_and_with_another_auto_end() -> None:
    from l3ptp.worker.engine import payload_budget
    from l3ptp.worker.session import accepted_mtu

    auto = mtus.derive(1500, 4)
    auto_payload = payload_budget(auto.max_datagram_size, 8, 65536)
    fixed_payload = payload_budget(MAX_DATAGRAM_SIZE_DEFAULT, 8, 65536)
    assert accepted_mtu(auto.mtu, MTU_DEFAULT, auto_payload, fixed_payload) == MTU_DEFAULT
    assert accepted_mtu(MTU_DEFAULT, auto.mtu, fixed_payload, auto_payload) == MTU_DEFAULT
    assert accepted_mtu(auto.mtu, auto.mtu, auto_payload, auto_payload) == auto.mtu == 1412
    # An IPv4-underlay auto end against an IPv6-underlay auto end: the smaller wins.
    v6 = mtus.derive(1500, 6)
    assert accepted_mtu(auto.mtu, v6.mtu, auto_payload, payload_budget(v6.max_datagram_size, 8, 65536)) == 1392


# -- status ---------------------------------------------------------------------------------------


def _status(choice: mtus.MtuChoice, negotiated: int = 0) -> Any:
    from l3ptp.controller.status import network_status
    from l3ptp.controller.supervision import NetworkSupervisor
    from l3ptp.ipc.control_messages import CLI_REPLIES, SessionState, StatusReply, WorkerStatus

    net = mtus.apply(net_of(mtu="auto"), choice)
    sup = NetworkSupervisor("office", 1)
    sup.start(0.0)
    sup.on_spawned(0, 100, 0.0)
    reports = {}
    if negotiated:
        reports[0] = WorkerStatus(network="office", queue=0, pid=100, state=SessionState.ESTABLISHED,
                                  peer="198.18.0.2:4433", rtt_ms=1.0, mtu=negotiated, counters={}, drops={},
                                  queue_depth=0, seq_lost=0, sessions=1, key_updates=0, last_error="")
    st = network_status(net, sup, reports, mtu_source=choice.source, mtu_note=choice.note)
    reply = StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,))
    assert CLI_REPLIES.decode_untrusted(CLI_REPLIES.encode(reply)) == reply  # the new fields travel
    return st


def test_status_shows_the_chosen_mtu_and_that_it_came_from_auto() -> None:
    from l3ptp.controller.cli import format_status
    from l3ptp.ipc.control_messages import StatusReply

    st = _status(mtus.derive(1500, 4, where="toward 198.18.0.2"))
    assert (st.mtu, st.interface_mtu, st.mtu_source) == (1412, 1412, "auto")
    text = format_status(StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,)))
    assert "  mtu: 1412 (auto: path MTU 1500 toward 198.18.0.2)" in text.splitlines()

    st = _status(mtus.derive(1500, 4, where="toward 198.18.0.2"), negotiated=1280)
    text = format_status(StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,)))
    assert "  mtu: 1280 (negotiated; interface 1412; auto: path MTU 1500 toward 198.18.0.2)" in text.splitlines()

    st = _status(mtus.derive(1300, 4))
    text = format_status(StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,)))
    assert ("  mtu: 1280 (auto-fallback: path MTU 1300 is below 1368, the least that carries 1280 over IPv4:"
            " fell back to 1280)") in text.splitlines()


def test_status_of_a_fixed_mtu_says_nothing_more() -> None:
    from l3ptp.controller.cli import format_status
    from l3ptp.ipc.control_messages import StatusReply

    st = _status(mtus.MtuChoice(1280, 1350, mtus.CONFIG))
    text = format_status(StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,)))
    assert "  mtu: 1280" in text.splitlines()


# -- the runtime keeps the choice; the probes are unprivileged --------------------------------------


def test_a_running_network_keeps_its_chosen_mtu_over_a_readvertising_reload() -> None:
    from l3ptp.controller.networks import NetworkRuntime

    configured = net_of(mtu="auto")
    rt = NetworkRuntime(configured, mtus.derive(1500, 4))
    assert (rt.net.mtu, rt.net.max_datagram_size, rt.configured) == (1412, 1472, configured)
    readvertised = dataclasses.replace(configured, advertised_routes=(ipaddress.ip_network("198.19.9.0/24"),))
    rt.reconfigure(readvertised, b"")
    assert (rt.net.mtu, rt.net.max_datagram_size, rt.configured) == (1412, 1472, readvertised)
    assert rt.net.advertised_routes == readvertised.advertised_routes
    assert NetworkRuntime(net_of()).mtu.source == mtus.CONFIG


def test_the_probes_work_without_privilege() -> None:
    from l3ptp.controller.pathmtu import interfaces_mtu, route_mtu

    assert route_mtu(IP("127.0.0.1"), 9) >= MTU_DEFAULT  # the loopback route's MTU
    assert interfaces_mtu("") >= 0  # loopback is never counted; a sandbox may have no other interface
