from __future__ import annotations

import ipaddress
import os

import pytest

from l3ptp.helper.policy import PolicyError, load_policy, parse_policy
from l3ptp.ipc.constants import RTPROT_L3PTP

BASE = {"controller_uids": [1000], "worker_uids": [1001]}


def test_defaults() -> None:
    p = parse_policy(BASE)
    assert p.controller_uids == {1000} and p.worker_uids == {1001}
    assert p.route_protocol == RTPROT_L3PTP and p.allow_default_route is False and p.allowed_prefixes == ()


def test_full_policy_from_toml(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
controller_uids = [1000]
worker_uids = [1001, 1002]
socket_group = "l3ptp"
socket_path = "/run/l3ptp/helper.sock"
interface_prefix = "l3p-"
max_networks = 2
max_queues = 4
max_routes = 16
allowed_prefixes = ["198.19.0.0/16", "fd00::/8"]
allow_default_route = true
route_protocol = 157
route_table = 100
socket_mark = 0x4c33
rule_priority = 5157
"""
    )
    os.chmod(path, 0o644)
    p = load_policy(str(path), check_owner=os.geteuid() == 0)
    assert p.worker_uids == {1001, 1002}
    assert p.allowed_prefixes == (ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert p.route_table == 100 and p.socket_group == "l3ptp"


@pytest.mark.parametrize(
    "extra",
    [
        {"bogus": 1},
        {"max_networks": 0},
        {"max_queues": 10_000},
        {"max_networks": True},
        {"allowed_prefixes": ["198.19.0.1/16"]},
        {"allowed_prefixes": "198.19.0.0/16"},
        {"allow_default_route": "yes"},
        {"route_protocol": 2},
        {"route_table": 0},
        {"route_table": 255},
        {"interface_prefix": "eth/"},
        {"interface_prefix": "a-very-long-prefix"},
        {"socket_path": "relative.sock"},
        {"controller_uids": [-1]},
        {"socket_mark": 0},
    ],
)
def test_invalid_values_are_errors(extra) -> None:
    with pytest.raises(PolicyError):
        parse_policy({**BASE, **extra})


def test_uid_lists_required() -> None:
    with pytest.raises(PolicyError, match="worker_uids"):
        parse_policy({"controller_uids": [1]})


def test_unknown_key_named(tmp_path) -> None:
    with pytest.raises(PolicyError, match="unknown policy keys: max_netwroks"):
        parse_policy({**BASE, "max_netwroks": 3})


def test_bad_toml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("controller_uids = [")
    with pytest.raises(PolicyError):
        load_policy(str(bad), check_owner=False)
    with pytest.raises(PolicyError):
        load_policy(str(tmp_path / "missing.toml"), check_owner=False)


def test_group_writable_policy_refused(tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("controller_uids = [1]\nworker_uids = [2]\n")
    os.chmod(path, 0o664)
    with pytest.raises(PolicyError, match="owned by root"):
        load_policy(str(path))


def test_user_names_resolve_and_unknown_user_is_named() -> None:
    import pwd

    root, nobody = pwd.getpwnam("root").pw_uid, pwd.getpwnam("nobody").pw_uid
    p = parse_policy({"controller_uids": ["root", 1000], "worker_uids": ["nobody"]})
    assert p.controller_uids == {root, 1000} and p.worker_uids == {nobody}
    with pytest.raises(PolicyError, match=r"worker_uids\[1\]: unknown user 'no-such-l3ptp-user'"):
        parse_policy({"controller_uids": [1], "worker_uids": ["nobody", "no-such-l3ptp-user"]})
    with pytest.raises(PolicyError, match="controller_uids"):
        parse_policy({"controller_uids": [1.5], "worker_uids": [2]})


def test_default_route_needs_a_separate_table() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy({**BASE, "allow_default_route": True})
    assert "allow_default_route" in str(info.value) and "route_table" in str(info.value)
    with pytest.raises(PolicyError, match="route_table"):
        parse_policy({**BASE, "allow_default_route": True, "route_table": 254})
    p = parse_policy({**BASE, "allow_default_route": True, "route_table": 100})
    assert p.allow_default_route and p.route_table == 100


def test_rule_priorities_stay_below_main() -> None:
    assert parse_policy({**BASE, "rule_priority": 32763}).rule_priority == 32763
    with pytest.raises(PolicyError, match="rule_priority"):
        parse_policy({**BASE, "rule_priority": 32764})
