"""Unit tests for l3ptp.controller.plan (pure)."""

from __future__ import annotations

from typing import Any

from l3ptp.controller.config import Config, parse_config
from l3ptp.controller.plan import Plan, diff
from tests.support.config_builders import KEY_B, config, lab, office


def cfg(networks: dict[str, Any], **sections: Any) -> Config:
    return parse_config(config(networks, **sections))


def test_first_start_adds_everything() -> None:
    new = cfg({"office": office(), "lab": lab()})
    assert diff(None, new) == Plan(added=("office", "lab"))


def test_same_config_changes_nothing() -> None:
    a = cfg({"office": office(), "lab": lab()})
    b = cfg({"office": office(), "lab": lab()})
    plan = diff(a, b)
    assert plan == Plan(unchanged=("office", "lab"))
    assert plan.empty


def test_add_remove_change_and_keep_in_one_reload() -> None:
    old = cfg({"office": office(), "lab": lab()})
    new = cfg(
        {
            "office": office(mtu=1200),
            "lab2": lab(local_ipv6="fd00:19:2::1/64", peer_ipv6="fd00:19:2::2/64"),
        }
    )
    plan = diff(old, new)
    assert plan.added == ("lab2",)
    assert plan.removed == ("lab",)
    assert plan.changed == ("office",)
    assert plan.unchanged == ()
    assert "added: lab2" in plan.summary() and "removed: lab" in plan.summary()


def test_enabling_or_disabling_is_a_change() -> None:
    old = cfg({"office": office(), "lab": lab()})
    new = cfg({"office": office(enabled=False), "lab": lab()})
    plan = diff(old, new)
    assert plan.changed == ("office",) and plan.unchanged == ("lab",)


def test_worker_globals_change_every_network() -> None:
    old = cfg({"office": office(), "lab": lab()})
    new = cfg({"office": office(), "lab": lab()}, node={"id": "beta", "key_file": "/etc/l3ptp/node.key"})
    assert diff(old, new).changed == ("office", "lab")
    new2 = cfg({"office": office(), "lab": lab()}, controller={"status_interval": 0.5})
    assert diff(old, new2).changed == ("office", "lab")


def test_controller_only_settings_need_a_restart_but_change_no_network() -> None:
    old = cfg({"office": office()})
    new = cfg({"office": office()}, controller={"runtime_dir": "/run/other"}, metrics={"port": 9999})
    plan = diff(old, new)
    assert plan.unchanged == ("office",)
    assert plan.restart_required == ("controller.runtime_dir", "metrics")
    assert not plan.empty
    assert "needs a controller restart" in plan.summary()


def test_polkit_switch_needs_a_restart() -> None:
    old = cfg({"office": office()})
    plan = diff(old, cfg({"office": office()}, controller={"polkit": True}))
    assert plan.restart_required == ("controller.polkit",) and plan.unchanged == ("office",)


def test_empty_summary() -> None:
    assert Plan().summary() == "no networks"


def test_only_advertised_routes_changed_is_live_not_restarted() -> None:
    old = cfg({"office": office(advertised_routes=["198.19.10.0/24"]), "lab": lab()})
    new = cfg({"office": office(advertised_routes=["198.19.11.0/24", "198.19.12.0/24"]), "lab": lab()})
    plan = diff(old, new)
    assert plan == Plan(unchanged=("lab",), live=("office",))
    assert not plan.empty and "applied live: office" in plan.summary()
    # together with anything else it is a change (restart)
    assert diff(old, cfg({"office": office(advertised_routes=["198.19.11.0/24"], mtu=1200), "lab": lab()})).changed \
        == ("office",)
    # and so is any change of what the workers are started with
    assert diff(old, cfg({"office": office(advertised_routes=["198.19.11.0/24"]), "lab": lab()},
                         controller={"status_interval": 0.5})).changed == ("office", "lab")


def test_keys_and_accepted_routes_are_applied_live() -> None:
    """Issue 18: pinned keys, accepted routes and key files change on a running network without a restart."""
    fp2 = KEY_B
    old = cfg({"office": office(), "lab": lab()})
    for change in ({"peer_keys": [office()["peer_key"], fp2]}, {"peer_key": fp2},
                   {"accepted_routes": ["198.19.40.0/24"]}, {"key_file": "/etc/l3ptp/office.key"}):
        plan = diff(old, cfg({"office": office(**change), "lab": lab()}))
        assert plan == Plan(unchanged=("lab",), live=("office",)), change
    # The node's key file: every network that uses it (not one with a key file of its own).
    new = cfg({"office": office(), "lab": lab(key_file="/etc/l3ptp/lab.key")})
    old = cfg({"office": office(), "lab": lab(key_file="/etc/l3ptp/lab.key")})
    moved = parse_config({**config({"office": office(), "lab": lab(key_file="/etc/l3ptp/lab.key")}),
                          "node": {"id": "alpha", "key_file": "/etc/l3ptp/node2.key"}})
    assert diff(old, new).unchanged == ("office", "lab")
    assert diff(old, moved) == Plan(unchanged=("lab",), live=("office",))
    # The node's id is not live: a restart.
    renamed = parse_config({**config({"office": office()}), "node": {"id": "beta", "key_file": "/etc/l3ptp/node.key"}})
    assert diff(cfg({"office": office()}), renamed).changed == ("office",)
    # Live and restart-needing changes together: a restart.
    assert diff(old, cfg({"office": office(peer_key=fp2, mtu=1290), "lab": lab(key_file="/etc/l3ptp/lab.key")})) \
        .changed == ("office",)
