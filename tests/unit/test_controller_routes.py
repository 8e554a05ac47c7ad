"""Unit tests for l3ptp.controller.routes (pure)."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from l3ptp.controller.config import NetworkConfig, parse_config
from l3ptp.controller.routes import RefusedRoute, RouteChanges, RouteTable, accept_routes
from tests.support.config_builders import config, office

NET = ipaddress.ip_network


def network(**overrides: Any) -> NetworkConfig:
    base = {"accepted_routes": ["198.19.8.0/21"], "queues": 2}
    base.update(overrides)
    return parse_config(config({"office": office(**base)})).networks[0]


def test_routes_inside_accepted_are_accepted() -> None:
    up = accept_routes(network(), ["198.19.8.0/24", "198.19.9.128/25", "198.19.8.0/21"])
    assert up.accepted == {NET("198.19.8.0/24"), NET("198.19.9.128/25"), NET("198.19.8.0/21")}
    assert up.refused == ()


def test_routes_outside_accepted_are_refused_with_reason() -> None:
    up = accept_routes(network(), ["198.19.16.0/24", "198.19.0.0/16", "10.0.0.0/8", "nonsense", "198.19.8.1/24"])
    assert up.accepted == frozenset()
    assert up.refused == (
        RefusedRoute("198.19.16.0/24", "outside accepted_routes"),
        RefusedRoute("198.19.0.0/16", "outside accepted_routes"),
        RefusedRoute("10.0.0.0/8", "outside accepted_routes"),
        RefusedRoute("nonsense", "not a valid prefix"),
        RefusedRoute("198.19.8.1/24", "not a valid prefix"),
    )


def test_nothing_is_accepted_when_install_routes_is_off() -> None:
    up = accept_routes(network(install_routes=False), ["198.19.8.0/24"])
    assert up.accepted == frozenset()
    assert up.refused == (RefusedRoute("198.19.8.0/24", "install_routes is off"),)


def test_default_route_needs_allow_default_route() -> None:
    refused = accept_routes(network(accepted_routes=["198.19.8.0/21"]), ["0.0.0.0/0"])
    assert refused.refused == (RefusedRoute("0.0.0.0/0", "default route and allow_default_route is off"),)
    allowed = network(accepted_routes=["0.0.0.0/0"], allow_default_route=True)
    assert accept_routes(allowed, ["0.0.0.0/0"]).accepted == {NET("0.0.0.0/0")}
    # a network that accepts 0/0 without allow_default_route (config forbids it): still refused
    sneaky = dataclasses.replace(allowed, allow_default_route=False)
    assert accept_routes(sneaky, ["0.0.0.0/0"]).refused[0].reason.startswith("default route")


def test_other_family_is_refused() -> None:
    up = accept_routes(network(), ["fd00:19:8::/48"])
    assert up.refused == (RefusedRoute("fd00:19:8::/48", "outside accepted_routes"),)


def test_newest_session_epoch_wins_and_stale_is_ignored() -> None:
    table = RouteTable(network())
    assert table.on_peer_routes(0, 1, 5, ["198.19.8.0/24"]) is not None
    assert table.on_peer_routes(0, 1, 4, ["198.19.9.0/24"]) is None  # older epoch
    assert table.on_peer_routes(0, 1, 5, ["198.19.9.0/24"]) is None  # same epoch
    assert table.desired() == {NET("198.19.8.0/24")}
    assert table.on_peer_routes(0, 2, 0, ["198.19.9.0/24"]) is not None  # new session, epoch restarts
    assert table.desired() == {NET("198.19.9.0/24")}
    assert table.on_peer_routes(0, 1, 99, ["198.19.10.0/24"]) is None  # older session


def test_changes_add_and_remove_withdrawn_routes() -> None:
    table = RouteTable(network())
    table.on_peer_routes(0, 1, 1, ["198.19.8.0/24", "198.19.9.0/24"])
    assert table.changes() == RouteChanges(add=(NET("198.19.8.0/24"), NET("198.19.9.0/24")))
    table.set_installed(["198.19.8.0/24", "198.19.9.0/24"])
    assert table.changes().empty
    table.on_peer_routes(0, 1, 2, ["198.19.9.0/24"])  # peer withdrew 8.0/24
    assert table.changes() == RouteChanges(remove=(NET("198.19.8.0/24"),))


def test_union_over_queues() -> None:
    table = RouteTable(network())
    table.on_peer_routes(0, 1, 1, ["198.19.8.0/24"])
    table.on_peer_routes(1, 1, 1, ["198.19.9.0/24"])
    assert table.desired() == {NET("198.19.8.0/24"), NET("198.19.9.0/24")}
    table.on_peer_routes(1, 1, 2, [])
    assert table.desired() == {NET("198.19.8.0/24")}


def test_reset_queue_accepts_a_restarted_workers_first_session() -> None:
    table = RouteTable(network())
    table.on_peer_routes(0, 3, 7, ["198.19.8.0/24"])
    table.reset_queue(0)
    assert table.desired() == {NET("198.19.8.0/24")}  # kept until the new session speaks
    assert table.on_peer_routes(0, 1, 0, ["198.19.9.0/24"]) is not None
    assert table.desired() == {NET("198.19.9.0/24")}
    table.reset_queue(5)  # unknown queue: no-op


def _slash28(start: int, n: int) -> list[str]:
    """n distinct /28 prefixes inside 198.19.64.0/18."""
    return [f"198.19.{64 + (start + i) // 16}.{(start + i) % 16 * 16}/28" for i in range(n)]


def test_union_over_queues_is_capped_at_the_network_route_limit() -> None:
    """Each queue's peer may advertise 256 routes; the union over queues stays
    within 256 (one helper request), the rest is refused with a reason."""
    from l3ptp.ipc.constants import MAX_ROUTES_PER_NETWORK
    from l3ptp.ipc.helper_messages import AddRoutes

    table = RouteTable(network(accepted_routes=["198.19.64.0/18"]))
    first = table.on_peer_routes(0, 1, 1, _slash28(0, 256))
    assert len(first.accepted) == 256 and first.refused == ()
    second = table.on_peer_routes(1, 1, 1, _slash28(200, 256))  # 56 shared, 200 new
    assert len(second.accepted) == 56
    assert len(second.refused) == 200 and {r.reason for r in second.refused} == {"network route limit (256) reached"}
    assert len(table.desired()) == MAX_ROUTES_PER_NETWORK
    add = table.changes().add
    AddRoutes(name="office", routes=tuple(str(r) for r in add), metric=100, allow_default=False)  # fits
    table.on_peer_routes(0, 1, 2, _slash28(0, 100))  # queue 0 withdraws 156 of its routes
    third = table.on_peer_routes(1, 1, 2, _slash28(200, 256))
    assert len(third.accepted) == 156 and len(third.refused) == 100
    assert len(table.desired()) == 256
