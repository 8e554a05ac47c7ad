"""Unit tests for l3ptp.controller.config (pure: no root, no network)."""

from __future__ import annotations

import dataclasses
import ipaddress
import pickle
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from l3ptp.controller.config import (
    Config,
    ConfigError,
    ControllerConfig,
    MetricsConfig,
    NetworkConfig,
    NodeConfig,
    UnderlayConfig,
    load_config,
    parse_config,
)
from l3ptp.ipc.constants import (
    HEADER_LEN,
    HELPER_SOCKET_DEFAULT,
    IFNAME_MAX,
    IFNAME_PREFIX_DEFAULT,
    KEEPALIVE_INTERVAL_DEFAULT,
    KEEPALIVE_INTERVAL_MAX,
    KEEPALIVE_INTERVAL_MIN,
    MAX_DATAGRAM_SIZE_DEFAULT,
    MAX_DATAGRAM_SIZE_MAX,
    MAX_DATAGRAM_SIZE_MIN,
    MAX_NETWORKS,
    MAX_PREFIXES_PER_LIST,
    MAX_QUEUES,
    METRICS_ADDRESS_DEFAULT,
    METRICS_PORT_DEFAULT,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    NETWORK_NAME_MAX,
    NODE_ID_MAX,
    QUIC_DATAGRAM_OVERHEAD_MAX,
    ROUTE_METRIC_DEFAULT,
    RUNTIME_DIR_DEFAULT,
    STATUS_INTERVAL,
    datagram_budget,
)
from tests.support.config_builders import DELETE, KEY_A, KEY_B, KEY_C, config, lab, office, underlay

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = DOCS / "examples/l3ptp.toml"

IP = ipaddress.ip_address
IFACE = ipaddress.ip_interface
NET = ipaddress.ip_network


def errors_of(data: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors, "a ConfigError must carry at least one error"
    return info.value.errors


def assert_error(data: Any, path: str, *fragments: str) -> str:
    """Assert some error is about `path` exactly and contains every fragment."""
    errors = errors_of(data)
    for error in errors:
        if error.startswith(f"{path}: ") and all(f in error for f in fragments):
            return error
    raise AssertionError(f"no error at {path!r} containing {fragments!r}; got:\n" + "\n".join(errors))


def assert_only_error(data: Any, path: str, *fragments: str) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return assert_error(data, path, *fragments)


def parse_net(net: dict[str, Any], name: str = "office") -> NetworkConfig:
    cfg = parse_config(config({name: net}))
    result = cfg.network(name)
    assert result is not None
    return result


# -- valid configurations -------------------------------------------------------------

FULL = f"""
[node]
id = "alpha-1.example_node"
key_file = "/etc/l3ptp/node.key"

[controller]
runtime_dir = "/run/l3ptp-test"
helper_socket = "/run/l3ptp-test/helper.sock"
interface_prefix = "tun-"
worker_user = "l3ptp"
status_interval = 2
admin_group = "l3ptp-admin"

[metrics]
enabled = false
address = "::1"
port = 9600

[networks.office]
enabled = false
interface = "tun-off"
role = "listen"
mtu = 1400
max_datagram_size = 1500
queues = 3
local_ipv4 = "198.19.0.1/30"
peer_ipv4 = "198.19.0.2/30"
local_ipv6 = "fd00:19::1/64"
peer_ipv6 = "fd00:19::2/64"
advertised_routes = ["198.19.10.0/24", "fd00:19:10::/64"]
accepted_routes = ["198.19.20.0/24", "198.19.20.0/25", "fd00:19:20::/64"]
allowed_sources = ["198.19.30.0/24"]
install_routes = false
allow_default_route = true
allow_overlap = true
route_metric = 4294967294
keepalive_interval = 5
peer_key = "{KEY_A}"
key_file = "/etc/l3ptp/office.key"

[networks.office.underlay]
local = "198.18.0.1"
peer = "198.18.0.2"
port = 5000

[networks.lab]
role = "connect"
local_ipv6 = "fd00:19:1::1/127"
peer_ipv6 = "fd00:19:1::/127"
peer_key = "{KEY_B}"

[networks.lab.underlay]
peer = "198.18.0.3"
port = 4433
"""


def test_full_config_round_trips_into_expected_values() -> None:
    cfg = parse_config(tomllib.loads(FULL))
    expected = Config(
        node=NodeConfig(id="alpha-1.example_node", key_file="/etc/l3ptp/node.key"),
        controller=ControllerConfig(
            runtime_dir="/run/l3ptp-test",
            helper_socket="/run/l3ptp-test/helper.sock",
            interface_prefix="tun-",
            worker_user="l3ptp",
            status_interval=2.0,
            admin_group="l3ptp-admin",
        ),
        metrics=MetricsConfig(enabled=False, address=IP("::1"), port=9600),
        networks=(
            NetworkConfig(
                name="office",
                enabled=False,
                interface="tun-off",
                role="listen",
                mtu=1400,
                max_datagram_size=1500,
                queues=3,
                local_ipv4=ipaddress.IPv4Interface("198.19.0.1/30"),
                peer_ipv4=ipaddress.IPv4Interface("198.19.0.2/30"),
                local_ipv6=ipaddress.IPv6Interface("fd00:19::1/64"),
                peer_ipv6=ipaddress.IPv6Interface("fd00:19::2/64"),
                advertised_routes=(NET("198.19.10.0/24"), NET("fd00:19:10::/64")),
                accepted_routes=(NET("198.19.20.0/24"), NET("198.19.20.0/25"), NET("fd00:19:20::/64")),
                allowed_sources=(NET("198.19.30.0/24"),),
                install_routes=False,
                allow_default_route=True,
                allow_overlap=True,
                route_metric=4294967294,
                keepalive_interval=5.0,
                engine="auto",
                event_loop="auto",
                offload="gro",  # the default
                cpus=(),
                peer_key=KEY_A,
                key_file="/etc/l3ptp/office.key",
                underlay=UnderlayConfig(local=IP("198.18.0.1"), peer=IP("198.18.0.2"), port=5000),
            ),
            NetworkConfig(
                name="lab",
                enabled=True,
                interface="tun-lab",
                role="connect",
                mtu=MTU_DEFAULT,
                max_datagram_size=MAX_DATAGRAM_SIZE_DEFAULT,
                queues=1,
                local_ipv4=None,
                peer_ipv4=None,
                local_ipv6=ipaddress.IPv6Interface("fd00:19:1::1/127"),
                peer_ipv6=ipaddress.IPv6Interface("fd00:19:1::/127"),
                advertised_routes=(),
                accepted_routes=(),
                allowed_sources=(),
                install_routes=True,
                allow_default_route=False,
                allow_overlap=False,
                route_metric=ROUTE_METRIC_DEFAULT,
                keepalive_interval=KEEPALIVE_INTERVAL_DEFAULT,
                engine="auto",
                event_loop="auto",
                offload="gro",  # the default
                cpus=(),
                peer_key=KEY_B,
                key_file="",
                underlay=UnderlayConfig(local=None, peer=IP("198.18.0.3"), port=4433),
            ),
        ),
    )
    assert cfg == expected
    assert isinstance(cfg.controller.status_interval, float)
    assert isinstance(cfg.networks[0].keepalive_interval, float)
    assert isinstance(cfg.networks[0].accepted_routes, tuple)


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config(config())
    assert cfg.controller == ControllerConfig(
        runtime_dir=RUNTIME_DIR_DEFAULT,
        helper_socket=HELPER_SOCKET_DEFAULT,
        interface_prefix=IFNAME_PREFIX_DEFAULT,
        worker_user="",
        status_interval=STATUS_INTERVAL,
        admin_group="",
    )
    assert cfg.metrics == MetricsConfig(enabled=True, address=IP(METRICS_ADDRESS_DEFAULT), port=METRICS_PORT_DEFAULT)
    net = cfg.networks[0]
    assert net.enabled is True
    assert net.interface == IFNAME_PREFIX_DEFAULT + "office"
    assert (net.mtu, net.max_datagram_size, net.queues) == (MTU_DEFAULT, MAX_DATAGRAM_SIZE_DEFAULT, 1)
    assert (net.install_routes, net.allow_default_route, net.allow_overlap) == (True, False, False)
    assert net.route_metric == ROUTE_METRIC_DEFAULT
    assert net.keepalive_interval == KEEPALIVE_INTERVAL_DEFAULT
    assert net.key_file == ""
    assert net.local_ipv6 is None and net.peer_ipv6 is None
    assert net.underlay == UnderlayConfig(local=IP("198.18.0.1"), peer=None, port=4433)


def test_default_mtu_fits_default_datagram_budget() -> None:
    assert MTU_DEFAULT <= datagram_budget(MAX_DATAGRAM_SIZE_DEFAULT)


def test_two_parses_are_equal_and_hash_equal() -> None:
    a = parse_config(tomllib.loads(FULL))
    b = parse_config(tomllib.loads(FULL))
    assert a == b
    assert hash(a) == hash(b)
    assert {a.networks[0], b.networks[0]} == {a.networks[0]}


def test_reload_diff_by_equality() -> None:
    old = parse_config(config({"office": office(), "lab": lab()}))
    new = parse_config(config({"office": office(mtu=1200), "lab": lab()}))
    assert old.network("lab") == new.network("lab")
    assert old.network("office") != new.network("office")
    changed = {n.name for n in new.networks} - {n.name for n in new.networks if n in old.networks}
    assert changed == {"office"}


def test_results_are_frozen() -> None:
    cfg = parse_config(config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.networks[0].mtu = 1300  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.id = "beta"  # type: ignore[misc]


def test_networks_keep_file_order_and_lookup_by_name() -> None:
    cfg = parse_config(config({"lab": lab(), "office": office()}))
    assert [n.name for n in cfg.networks] == ["lab", "office"]
    assert cfg.network("office") is cfg.networks[1]
    assert cfg.network("missing") is None


def test_config_without_networks_is_valid() -> None:
    assert parse_config(config({})).networks == ()
    data = config()
    del data["networks"]
    assert parse_config(data) == Config(node=NodeConfig(id="alpha", key_file="/etc/l3ptp/node.key"))


def test_default_runtime_dir_is_the_controller_units_not_the_helpers() -> None:
    # The controller unit has RuntimeDirectory=l3ptp/ctl; /run/l3ptp is root's (helper socket).
    assert RUNTIME_DIR_DEFAULT == "/run/l3ptp/ctl"
    assert RUNTIME_DIR_DEFAULT != str(Path(HELPER_SOCKET_DEFAULT).parent)
    assert parse_config(config()).controller.runtime_dir == "/run/l3ptp/ctl"


def test_example_file_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.controller.runtime_dir == RUNTIME_DIR_DEFAULT
    assert len(cfg.networks) == 1
    net = cfg.networks[0]
    assert net.role == "listen"
    assert net.queues == 2
    assert net.local_ipv4 is not None and net.local_ipv6 is not None
    assert net.advertised_routes and net.accepted_routes


# -- load_config ---------------------------------------------------------------------


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "l3ptp.toml"
    path.write_text(FULL, encoding="utf-8")
    assert load_config(path) == parse_config(tomllib.loads(FULL))
    assert load_config(str(path)) == load_config(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "cannot read configuration file" in str(info.value)
    assert "No such file" in str(info.value)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path)


def test_load_config_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nid = "alpha\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: TOML syntax error")
    assert "line 2" in text


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nid = "\xe9"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_load_config_validation_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "l3ptp.toml"
    path.write_text(FULL.replace("mtu = 1400", "mtu = 70000"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == (f"networks.office.mtu: 70000 is outside {MTU_MIN}..{MTU_MAX}",)
    assert str(info.value) == f"{path}: networks.office.mtu: 70000 is outside {MTU_MIN}..{MTU_MAX}"


# -- ConfigError ---------------------------------------------------------------------


def test_config_error_lists_every_error_one_per_line() -> None:
    err = ConfigError(["a.b: one", "c: two"], source="x.toml")
    assert err.errors == ("a.b: one", "c: two")
    assert str(err).splitlines() == ["x.toml: a.b: one", "x.toml: c: two"]


def test_config_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ConfigError(["a: b"], source="x.toml")))
    assert err.errors == ("a: b",) and err.source == "x.toml"


def test_many_independent_errors_are_reported_together() -> None:
    data = config(
        {
            "office": office(mtu=70000, mttu=1, role=DELETE, accepted_routes=["198.19.1.1/24"]),
            "lab": underlay(lab(queues=0), port=0),
        },
        node={"id": "bad id", "key_file": "relative.key"},
        metrics={"port": 0},
    )
    errors = errors_of(data)
    for path in (
        "node.id",
        "node.key_file",
        "metrics.port",
        "networks.office",
        "networks.office.role",
        "networks.office.mtu",
        "networks.office.accepted_routes[0]",
        "networks.lab.queues",
        "networks.lab.underlay.port",
    ):
        assert any(e.startswith(f"{path}: ") for e in errors), (path, errors)
    assert len(errors) >= 9
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert len(str(info.value).splitlines()) == len(errors)


# -- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "key"),
    [
        (config(nodes={}), "(top level)", "nodes"),
        (config(node={"id": "a", "key_file": "/k", "idd": 1}), "node", "idd"),
        (config(controller={"runtime": "/run"}), "controller", "runtime"),
        (config(metrics={"addr": "127.0.0.1"}), "metrics", "addr"),
        (config({"office": office(mttu=1280)}), "networks.office", "mttu"),
        (config({"office": underlay(office(), prot=1)}), "networks.office.underlay", "prot"),
    ],
)
def test_unknown_keys_are_rejected(data: dict[str, Any], path: str, key: str) -> None:
    assert_only_error(data, path, f"unknown key {key!r}")


def test_unknown_key_suggests_close_match() -> None:
    error = assert_only_error(config({"office": office(mttu=1280)}), "networks.office")
    assert error == "networks.office: unknown key 'mttu' (did you mean 'mtu'?)"


# -- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("net", "path", "message"),
    [
        (office(mtu="1280"), "networks.office.mtu", "'1280' is not a valid MTU: an integer 576..9000, or \"auto\""),
        (office(mtu=True), "networks.office.mtu", "expected an integer, got a boolean"),
        (office(mtu=1280.0), "networks.office.mtu", "expected an integer, got a float"),
        (office(queues=[1]), "networks.office.queues", "expected an integer, got an array"),
        (office(enabled="yes"), "networks.office.enabled", "expected a boolean, got a string"),
        (office(install_routes=1), "networks.office.install_routes", "expected a boolean, got an integer"),
        (office(allow_overlap=0), "networks.office.allow_overlap", "expected a boolean, got an integer"),
        (office(allow_default_route="no"), "networks.office.allow_default_route", "expected a boolean"),
        (office(role=1), "networks.office.role", "expected a string, got an integer"),
        (office(interface=5), "networks.office.interface", "expected a string, got an integer"),
        (office(keepalive_interval="10"), "networks.office.keepalive_interval", "expected a number, got a string"),
        (office(keepalive_interval=True), "networks.office.keepalive_interval", "expected a number, got a boolean"),
        (office(route_metric=1.5), "networks.office.route_metric", "expected an integer, got a float"),
        (office(local_ipv4=1), "networks.office.local_ipv4", "expected a string, got an integer"),
        (office(accepted_routes="198.19.5.0/24"), "networks.office.accepted_routes", "expected an array, got a string"),
        (office(advertised_routes=[1]), "networks.office.advertised_routes[0]", "expected a string, got an integer"),
        (office(allowed_sources={}), "networks.office.allowed_sources", "expected an array, got a table"),
        (office(peer_key=b"x"), "networks.office.peer_key", "expected a string, got a value of type bytes"),
        (office(key_file=0), "networks.office.key_file", "expected a string, got an integer"),
        (office(underlay="198.18.0.1:4433"), "networks.office.underlay", "expected a table, got a string"),
        (underlay(office(), port="4433"), "networks.office.underlay.port", "expected an integer, got a string"),
        (underlay(office(), local=3323068417), "networks.office.underlay.local", "expected a string, got an integer"),
    ],
)
def test_wrong_types_are_rejected(net: dict[str, Any], path: str, message: str) -> None:
    assert_error(config({"office": net}), path, message)


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ([], "(top level)", "expected a table, got an array"),
        (config(node="alpha"), "node", "expected a table, got a string"),
        (config(node={"id": 5, "key_file": "/k"}), "node.id", "expected a string, got an integer"),
        (config(controller=[]), "controller", "expected a table, got an array"),
        (config(controller={"status_interval": "1"}), "controller.status_interval", "expected a number"),
        (config(controller={"worker_user": 0}), "controller.worker_user", "expected a string, got an integer"),
        (config(metrics={"enabled": "true"}), "metrics.enabled", "expected a boolean, got a string"),
        (config(metrics={"port": 9586.0}), "metrics.port", "expected an integer, got a float"),
        (config(networks=[]), "networks", "expected a table, got an array"),
        (config({"office": "x"}), "networks.office", "expected a table, got a string"),
    ],
)
def test_wrong_types_in_other_sections(data: Any, path: str, message: str) -> None:
    assert_error(data, path, message)


def test_toml_datetime_type_is_named() -> None:
    data = tomllib.loads("[node]\nid = 1979-05-27\nkey_file = '/k'\n")
    assert_only_error(data, "node.id", "expected a string, got a date")


# -- required keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (config(node=DELETE), "node"),
        (config(node={"key_file": "/k"}), "node.id"),
        (config(node={"id": "alpha"}), "node.key_file"),
        (config({"office": office(role=DELETE)}), "networks.office.role"),
        (config({"office": office(peer_key=DELETE)}), "networks.office.peer_key"),
        (config({"office": office(underlay=DELETE)}), "networks.office.underlay"),
        (config({"office": underlay(office(), port=DELETE)}), "networks.office.underlay.port"),
    ],
)
def test_missing_required_keys(data: dict[str, Any], path: str) -> None:
    assert errors_of(data) == (f"{path}: required",)


# -- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "lo", "hi"),
    [
        ("mtu", MTU_MIN - 1, MTU_MIN, MTU_MAX),
        ("mtu", 70000, MTU_MIN, MTU_MAX),
        ("max_datagram_size", MAX_DATAGRAM_SIZE_MIN - 1, MAX_DATAGRAM_SIZE_MIN, MAX_DATAGRAM_SIZE_MAX),
        ("max_datagram_size", MAX_DATAGRAM_SIZE_MAX + 1, MAX_DATAGRAM_SIZE_MIN, MAX_DATAGRAM_SIZE_MAX),
        ("queues", 0, 1, MAX_QUEUES),
        ("queues", MAX_QUEUES + 1, 1, MAX_QUEUES),
        ("route_metric", -1, 0, 2**32 - 2),
        ("route_metric", 2**32 - 1, 0, 2**32 - 2),
    ],
)
def test_integer_ranges(key: str, value: int, lo: int, hi: int) -> None:
    data = config({"office": office(**{key: value})})
    assert_only_error(data, f"networks.office.{key}", f"{value} is outside {lo}..{hi}")


def test_exact_range_message() -> None:
    assert errors_of(config({"office": office(mtu=70000)})) == (
        f"networks.office.mtu: 70000 is outside {MTU_MIN}..{MTU_MAX}",
    )


@pytest.mark.parametrize(
    "value", [KEEPALIVE_INTERVAL_MIN / 2, KEEPALIVE_INTERVAL_MAX + 1, float("inf"), float("nan"), 0]
)
def test_keepalive_interval_range(value: float) -> None:
    data = config({"office": office(keepalive_interval=value)})
    assert_only_error(data, "networks.office.keepalive_interval", "outside")


@pytest.mark.parametrize("value", [KEEPALIVE_INTERVAL_MIN, KEEPALIVE_INTERVAL_MAX, 1])
def test_keepalive_interval_bounds_accepted(value: float) -> None:
    assert parse_net(office(keepalive_interval=value)).keepalive_interval == float(value)


@pytest.mark.parametrize("value", [0.05, 2.6, 61, -1.0, float("nan")])
def test_status_interval_range(value: float) -> None:
    # Capped well below WORKER_STATUS_TIMEOUT so a healthy worker is never declared dead.
    assert_only_error(config(controller={"status_interval": value}), "controller.status_interval", "outside 0.1..2.5")


@pytest.mark.parametrize("value", [0.1, 2.5, 1])
def test_status_interval_bounds_accepted(value: float) -> None:
    assert parse_config(config(controller={"status_interval": value})).controller.status_interval == float(value)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_metrics_port_range(port: int) -> None:
    assert_only_error(config(metrics={"port": port}), "metrics.port", "outside 1..65535")


@pytest.mark.parametrize("port", [0, 65536])
def test_underlay_port_range(port: int) -> None:
    data = config({"office": underlay(office(), port=port)})
    assert_only_error(data, "networks.office.underlay.port", "outside 1..65535")


def test_underlay_port_plus_queues_must_fit_with_per_queue_ports() -> None:
    error = assert_only_error(
        config({"office": underlay(office(queues=3), port=65534, ports="per-queue")}), "networks.office.underlay.port",
        "65536",
    )
    assert "65535" in error
    assert parse_net(underlay(office(queues=2), port=65534, ports="per-queue")).queue_port(1) == 65535


def test_underlay_ports_shared_by_default_every_queue_on_the_one_port() -> None:
    net = parse_net(underlay(office(queues=3), port=65535))
    assert net.underlay.ports == "shared"
    assert [net.queue_port(q) for q in range(3)] == [65535] * 3
    assert_only_error(config({"office": underlay(office(), ports="one")}), "networks.office.underlay.ports",
                      "'shared'")


def test_shared_port_networks_collide_only_on_their_one_port() -> None:
    a = underlay(office(queues=4), port=5000)
    b = underlay(office(interface="l3p-b", queues=4, local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24"),
                 port=5001)
    parse_config(config({"a": a, "b": b}))  # per-queue, a's 5000..5003 would hold 5001
    assert_only_error(config({"a": underlay(a, ports="per-queue"), "b": b}), "networks.b.underlay.port", "collide")


# -- MTU budget ---------------------------------------------------------------------------------


def test_mtu_over_datagram_budget() -> None:
    budget = datagram_budget(MAX_DATAGRAM_SIZE_DEFAULT)
    error = assert_only_error(config({"office": office(mtu=budget + 1)}), "networks.office.mtu")
    assert f"budget {budget}" in error
    assert f"max_datagram_size {MAX_DATAGRAM_SIZE_DEFAULT}" in error
    assert f"at least {MAX_DATAGRAM_SIZE_DEFAULT + 1}" in error


def test_mtu_at_budget_is_accepted() -> None:
    mds = 2000
    budget = datagram_budget(mds)
    assert budget == mds - QUIC_DATAGRAM_OVERHEAD_MAX - HEADER_LEN
    net = parse_net(office(mtu=budget, max_datagram_size=mds))
    assert net.mtu == budget


def test_max_mtu_needs_large_datagrams() -> None:
    assert_only_error(config({"office": office(mtu=MTU_MAX)}), "networks.office.mtu", "budget")
    assert parse_net(office(mtu=MTU_MAX, max_datagram_size=MAX_DATAGRAM_SIZE_MAX)).mtu == MTU_MAX


def test_ipv6_needs_ipv6_minimum_mtu() -> None:
    net = office(mtu=MTU_MIN, local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64")
    assert_only_error(config({"office": net}), "networks.office.mtu", "IPv6 minimum link MTU")
    assert parse_net(office(mtu=MTU_MIN)).mtu == MTU_MIN  # IPv4-only: fine


# -- tunnel addresses -------------------------------------------------------------------------


def test_at_least_one_local_address() -> None:
    net = office(local_ipv4=DELETE, peer_ipv4=DELETE)
    assert errors_of(config({"office": net})) == (
        "networks.office: at least one of local_ipv4, local_ipv6 is required",
    )


def test_ipv6_only_network_is_valid() -> None:
    net = parse_net(lab(), "lab")
    assert net.addresses() == (IFACE("fd00:19:1::1/64"),)
    assert net.local_ipv4 is None


@pytest.mark.parametrize("version", [4, 6])
def test_local_address_needs_peer(version: int) -> None:
    net = office(local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64")
    del net[f"peer_ipv{version}"]
    assert_only_error(
        config({"office": net}), f"networks.office.peer_ipv{version}", "missing peer settings", f"local_ipv{version}"
    )


@pytest.mark.parametrize("version", [4, 6])
def test_peer_address_needs_local(version: int) -> None:
    net = office(local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64")
    del net[f"local_ipv{version}"]
    assert_only_error(config({"office": net}), f"networks.office.local_ipv{version}", "missing local settings")


def test_only_peer_addresses() -> None:
    net = office(local_ipv4=DELETE)
    assert_only_error(config({"office": net}), "networks.office.local_ipv4", "required because peer_ipv4 is set")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("local_ipv4", "fd00:19::1/64", "is an IPv6 address, expected IPv4"),
        ("peer_ipv4", "fd00:19::2/64", "is an IPv6 address, expected IPv4"),
        ("local_ipv6", "198.19.0.1/24", "is an IPv4 address, expected IPv6"),
        ("local_ipv4", "198.19.0.1", "needs a prefix length"),
        ("local_ipv4", "198.19.0.300/24", "not a valid IPv4 address with prefix length"),
        ("local_ipv4", "198.19.0.1/33", "not a valid IPv4 address with prefix length"),
        ("local_ipv4", "198.19.0.0/24", "subnet's own address"),
        ("local_ipv4", "198.19.0.255/24", "broadcast address"),
        ("local_ipv6", "fd00:19::/64", "subnet's own address"),
        ("local_ipv4", "0.0.0.0/24", "unspecified address"),
        ("local_ipv4", "127.0.0.1/8", "loopback address"),
        ("local_ipv6", "ff02::1/64", "multicast address"),
    ],
)
def test_invalid_tunnel_address(key: str, value: str, message: str) -> None:
    net = office(local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64")
    net[key] = value
    assert_error(config({"office": net}), f"networks.office.{key}", message)


@pytest.mark.parametrize(
    ("local", "peer"),
    [("198.19.0.0/31", "198.19.0.1/31"), ("fd00:19::/127", "fd00:19::1/127")],
)
def test_point_to_point_prefixes_may_use_every_address(local: str, peer: str) -> None:
    version = IFACE(local).version
    net = office(local_ipv4=DELETE, peer_ipv4=DELETE)
    net.update({f"local_ipv{version}": local, f"peer_ipv{version}": peer})
    assert parse_net(net).peer_addresses() == (IFACE(peer),)


def test_peer_must_be_inside_local_subnet() -> None:
    assert_only_error(
        config({"office": office(peer_ipv4="198.19.1.2/24")}),
        "networks.office.peer_ipv4",
        "outside local_ipv4's subnet 198.19.0.0/24",
    )


def test_peer_must_differ_from_local() -> None:
    assert_only_error(
        config({"office": office(peer_ipv4="198.19.0.1/24")}), "networks.office.peer_ipv4", "same address as local_ipv4"
    )


def test_prefix_lengths_must_match() -> None:
    assert_only_error(
        config({"office": office(peer_ipv4="198.19.0.2/25")}), "networks.office.peer_ipv4", "/25 differs", "/24"
    )


def test_prefix_lengths_must_match_ipv6() -> None:
    error = assert_error(config({"office": lab(peer_ipv6="fd00:19:1::2/48")}), "networks.office.peer_ipv6")
    assert "/48 differs" in error


@pytest.mark.parametrize(
    ("first", "second", "path", "other"),
    [
        ({"local_ipv4": "198.19.0.1/24"}, {"local_ipv4": "198.19.0.1/24"}, "local_ipv4", "local_ipv4"),
        ({"local_ipv4": "198.19.0.1/24"}, {"peer_ipv4": "198.19.0.1/24"}, "peer_ipv4", "local_ipv4"),
        ({"peer_ipv4": "198.19.0.2/24"}, {"local_ipv4": "198.19.0.2/24"}, "local_ipv4", "peer_ipv4"),
    ],
)
def test_duplicate_tunnel_addresses_across_networks(
    first: dict[str, str], second: dict[str, str], path: str, other: str
) -> None:
    a = office(**first)
    b = underlay(office(interface="l3p-b", allow_overlap=True, **second), port=5000)
    if "local_ipv4" not in second:
        b["local_ipv4"] = "198.19.0.3/24"
    if "peer_ipv4" not in second:
        b["peer_ipv4"] = "198.19.0.4/24"
    error = assert_only_error(config({"a": a, "b": b}), f"networks.b.{path}", f"networks.a.{other}")
    assert "already used" in error


def test_duplicate_ipv6_tunnel_address_across_networks() -> None:
    b = lab(local_ipv6="fd00:19:1::5/64", peer_ipv6="fd00:19:1::2/64", allow_overlap=True)
    assert_only_error(
        config({"a": lab(), "b": b}), "networks.b.peer_ipv6", "fd00:19:1::2 is already used by networks.a.peer_ipv6"
    )


# -- prefixes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["advertised_routes", "accepted_routes", "allowed_sources"])
def test_prefixes_are_strict(key: str) -> None:
    net = office(**{key: ["198.19.5.0/24", "198.19.6.0/24", "198.19.1.1/24"]})
    error = assert_only_error(config({"office": net}), f"networks.office.{key}[2]")
    assert error == f"networks.office.{key}[2]: 198.19.1.1/24 has host bits set (did you mean 198.19.1.0/24?)"


@pytest.mark.parametrize("value", ["not-a-prefix", "198.19.0.0/33", "fd00::/129", ""])
def test_invalid_prefix(value: str) -> None:
    data = config({"office": office(allowed_sources=[value])})
    assert_only_error(data, "networks.office.allowed_sources[0]", "not a valid IP prefix")


def test_bare_address_is_a_host_prefix() -> None:
    assert parse_net(office(allowed_sources=["198.19.7.7"])).allowed_sources == (NET("198.19.7.7/32"),)


@pytest.mark.parametrize("key", ["advertised_routes", "accepted_routes", "allowed_sources"])
def test_prefix_list_length_limit(key: str) -> None:
    many = [f"198.19.{i // 256}.{i % 256}/32" for i in range(MAX_PREFIXES_PER_LIST + 1)]
    assert_only_error(
        config({"office": office(**{key: many})}),
        f"networks.office.{key}",
        f"has {MAX_PREFIXES_PER_LIST + 1} entries, at most {MAX_PREFIXES_PER_LIST}",
    )


def test_prefix_list_at_limit_is_accepted_but_derived_lists_are_capped() -> None:
    full = [f"198.19.{i // 256 + 100}.{i % 256}/32" for i in range(MAX_PREFIXES_PER_LIST)]
    net = office(advertised_routes=full[: MAX_PREFIXES_PER_LIST - 1])  # + 1 local address = limit
    assert len(parse_net(net).local_sources()) == MAX_PREFIXES_PER_LIST
    assert_only_error(config({"office": office(advertised_routes=full)}), "networks.office", "local_sources")
    half = MAX_PREFIXES_PER_LIST // 2
    net = office(accepted_routes=full[:half], allowed_sources=full[half:])  # + 1 peer address
    assert_only_error(config({"office": net}), "networks.office", "peer_sources")


def test_duplicate_prefix_in_list() -> None:
    net = office(advertised_routes=["198.19.5.0/24", "198.19.6.0/24", "198.19.5.0/24"])
    assert_only_error(
        config({"office": net}),
        "networks.office.advertised_routes[2]",
        "198.19.5.0/24 duplicates networks.office.advertised_routes[0]",
    )


def test_duplicate_accepted_route_is_reported_even_with_allow_overlap() -> None:
    net = office(accepted_routes=["198.19.5.0/24", "198.19.5.0/24"], allow_overlap=True)
    assert_only_error(config({"office": net}), "networks.office.accepted_routes[1]", "duplicates")


@pytest.mark.parametrize("key", ["advertised_routes", "accepted_routes", "allowed_sources"])
def test_prefix_family_needs_tunnel_address(key: str) -> None:
    assert_only_error(
        config({"office": office(**{key: ["fd00:19:5::/64"]})}),
        f"networks.office.{key}[0]",
        "IPv6 prefix but the network has no IPv6 tunnel address",
    )


@pytest.mark.parametrize("default", ["0.0.0.0/0", "::/0"])
def test_default_route_needs_allow_default_route(default: str) -> None:
    net = office(local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64", accepted_routes=["198.19.5.0/24", default])
    error = assert_error(config({"office": net}), "networks.office.accepted_routes[1]", "default route")
    assert "allow_default_route = true" in error
    net["allow_overlap"] = True
    assert_only_error(config({"office": net}), "networks.office.accepted_routes[1]", "default route")
    net["allow_default_route"] = True
    net["allow_overlap"] = True
    assert NET(default) in parse_net(net).accepted_routes


def test_default_route_alone_needs_no_allow_overlap() -> None:
    net = parse_net(office(accepted_routes=["0.0.0.0/0"], allow_default_route=True))
    assert net.accepted_routes == (NET("0.0.0.0/0"),)


@pytest.mark.parametrize("key", ["advertised_routes", "allowed_sources"])
def test_default_prefix_outside_accepted_routes_needs_no_opt_in(key: str) -> None:
    assert parse_net(office(**{key: ["0.0.0.0/0"]}))


# -- overlapping routes -------------------------------------------------------------------------


def test_overlap_within_one_network() -> None:
    net = office(accepted_routes=["198.19.4.0/22", "198.19.8.0/24", "198.19.5.0/24"])
    error = assert_only_error(config({"office": net}), "networks.office.accepted_routes[2]")
    assert "networks.office.accepted_routes[0]" in error
    assert "198.19.5.0/24 overlaps 198.19.4.0/22" in error
    assert "set allow_overlap = true on networks.office" in error
    net["allow_overlap"] = True
    assert len(parse_net(net).accepted_routes) == 3


def test_overlap_across_networks() -> None:
    a = office(accepted_routes=["198.19.4.0/22"])
    b = lab(local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24", accepted_routes=["198.19.6.0/24"])
    data = config({"a": a, "b": b})
    error = assert_only_error(data, "networks.b.accepted_routes[0]", "networks.a.accepted_routes[0]")
    assert "set allow_overlap = true on networks.a or networks.b" in error


@pytest.mark.parametrize("which", ["a", "b"])
def test_overlap_across_networks_allowed_by_either(which: str) -> None:
    nets = {
        "a": office(accepted_routes=["198.19.4.0/22"]),
        "b": lab(local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24", accepted_routes=["198.19.4.0/22"]),
    }
    nets[which]["allow_overlap"] = True
    cfg = parse_config(config(nets))
    assert len(cfg.networks) == 2


def test_identical_routes_in_two_networks_overlap() -> None:
    a = office(accepted_routes=["198.19.4.0/24"])
    b = lab(local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24", accepted_routes=["198.19.4.0/24"])
    assert_only_error(config({"a": a, "b": b}), "networks.b.accepted_routes[0]", "networks.a.accepted_routes[0]")


def test_disjoint_routes_do_not_overlap() -> None:
    routes = ["198.19.4.0/24", "198.19.5.0/24", "198.19.6.0/23", "fd00:19:5::/64"]
    net = office(accepted_routes=routes, local_ipv6="fd00:19::1/64", peer_ipv6="fd00:19::2/64")
    assert len(parse_net(net).accepted_routes) == 4


def test_advertised_and_allowed_prefixes_may_overlap() -> None:
    nested = ["198.19.4.0/22", "198.19.5.0/24"]
    net = office(advertised_routes=nested, allowed_sources=nested)
    assert parse_net(net)


def test_accepted_route_may_contain_own_tunnel_subnet() -> None:
    assert parse_net(office(accepted_routes=["198.19.0.0/16"]))


def test_tunnel_subnets_of_two_networks_must_not_overlap() -> None:
    b = lab(local_ipv4="198.19.0.5/25", peer_ipv4="198.19.0.6/25")
    error = assert_only_error(config({"a": office(), "b": b}), "networks.b.local_ipv4", "networks.a.local_ipv4")
    assert "tunnel subnet 198.19.0.0/25 overlaps tunnel subnet 198.19.0.0/24" in error
    b["allow_overlap"] = True
    assert parse_config(config({"a": office(), "b": b}))


def test_accepted_route_over_other_networks_tunnel_subnet() -> None:
    b = lab(local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24", accepted_routes=["198.19.0.0/16"])
    error = assert_only_error(config({"a": office(), "b": b}), "networks.a.local_ipv4", "networks.b.accepted_routes[0]")
    assert "tunnel subnet 198.19.0.0/24 overlaps 198.19.0.0/16" in error


def test_default_route_overlaps_other_networks() -> None:
    a = office(accepted_routes=["0.0.0.0/0"], allow_default_route=True)
    b = lab(local_ipv4="198.19.1.1/24", peer_ipv4="198.19.1.2/24")
    assert_only_error(config({"a": a, "b": b}), "networks.b.local_ipv4", "0.0.0.0/0 at networks.a.accepted_routes[0]")
    a["allow_overlap"] = True
    assert parse_config(config({"a": a, "b": b}))


# -- interface names ----------------------------------------------------------------------------


def test_interface_defaults_to_prefix_plus_name() -> None:
    cfg = parse_config(config({"office": office()}, controller={"interface_prefix": "x"}))
    assert cfg.networks[0].interface == "xoffice"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("l3p-Office", "a-z, 0-9 and '-'"),
        ("l3p_office", "a-z, 0-9 and '-'"),
        ("l3p-off.ce", "a-z, 0-9 and '-'"),
        ("l3p-é", "a-z, 0-9 and '-'"),
        ("", "must not be empty"),
        ("l3p-" + "a" * (IFNAME_MAX - 3), f"{IFNAME_MAX + 1} bytes long, at most {IFNAME_MAX}"),
        ("tun-office", "must start with interface_prefix 'l3p-'"),
        ("l3p-", "longer than it"),
    ],
)
def test_invalid_interface_names(value: str, message: str) -> None:
    assert_only_error(config({"office": office(interface=value)}), "networks.office.interface", message)


def test_interface_at_max_length_is_accepted() -> None:
    name = "l3p-" + "a" * (IFNAME_MAX - 4)
    assert parse_net(office(interface=name)).interface == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("my_net", "a-z, 0-9 and '-'"),
        ("abcdefghijklm", "bytes long"),
    ],
)
def test_derived_interface_name_must_be_valid(name: str, message: str) -> None:
    error = assert_only_error(config({name: office()}), f"networks.{name}.interface", message)
    assert "set interface explicitly" in error
    assert parse_net(office(interface="l3p-ok"), name).interface == "l3p-ok"


def test_duplicate_interface_names() -> None:
    b = lab(interface="l3p-a")
    assert_only_error(
        config({"a": office(), "b": b}), "networks.b.interface", "'l3p-a' is already used by networks.a.interface"
    )


@pytest.mark.parametrize("prefix", ["", "L3P-", "a_", "-x", "a" * IFNAME_MAX, 5])
def test_invalid_interface_prefix(prefix: Any) -> None:
    assert_error(config(controller={"interface_prefix": prefix}), "controller.interface_prefix")


def test_invalid_interface_prefix_does_not_cascade() -> None:
    errors = errors_of(config(controller={"interface_prefix": "BAD"}))
    assert len(errors) == 1 and errors[0].startswith("controller.interface_prefix: ")


# -- underlay ---------------------------------------------------------------------------------------


def test_listen_requires_local() -> None:
    assert_only_error(
        config({"office": underlay(office(), local=DELETE)}),
        "networks.office.underlay.local",
        "required for role 'listen'",
    )


def test_connect_requires_peer() -> None:
    assert_only_error(
        config({"lab": underlay(lab(), peer=DELETE)}), "networks.lab.underlay.peer", "required for role 'connect'"
    )


def test_optional_underlay_addresses() -> None:
    listen = parse_net(underlay(office(), peer="198.18.0.2"))
    assert listen.underlay.peer == IP("198.18.0.2")
    connect = parse_net(underlay(lab(), local="198.18.0.1"), "lab")
    assert connect.underlay == UnderlayConfig(local=IP("198.18.0.1"), peer=IP("198.18.0.3"), port=4433)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("local", "198.18.0.999", "not a valid IP address"),
        ("local", "198.18.0.1/24", "not a valid IP address"),
        ("local", "224.0.0.1", "multicast"),
        ("peer", "0.0.0.0", "not a unicast address"),
        ("peer", "224.0.0.1", "not a unicast address"),
        ("peer", "fd00:18::2", "is IPv6 but underlay.local 198.18.0.1 is IPv4"),
    ],
)
def test_invalid_underlay_addresses(key: str, value: str, message: str) -> None:
    data = config({"office": underlay(office(), **{key: value})})
    assert_only_error(data, f"networks.office.underlay.{key}", message)


@pytest.mark.parametrize("local", ["0.0.0.0", "::"])
def test_listen_on_wildcard(local: str) -> None:
    assert parse_net(underlay(office(), local=local)).underlay.local == IP(local)


@pytest.mark.parametrize(
    ("a_local", "a_port", "a_queues", "b_local", "b_port", "b_queues", "collide"),
    [
        ("198.18.0.1", 4433, 1, "198.18.0.1", 4433, 1, True),
        ("198.18.0.1", 4433, 2, "198.18.0.1", 4434, 1, True),
        ("198.18.0.1", 4433, 2, "198.18.0.1", 4435, 2, False),
        ("198.18.0.1", 4433, 1, "198.18.0.2", 4433, 1, False),
        ("0.0.0.0", 4433, 1, "198.18.0.2", 4433, 1, True),
        ("198.18.0.2", 4433, 1, "0.0.0.0", 4433, 1, True),
        ("::", 4433, 1, "198.18.0.2", 4433, 1, True),
        ("0.0.0.0", 4433, 1, "fd00:18::1", 4433, 1, False),
        ("fd00:18::1", 4433, 1, "fd00:18::1", 4433, 1, True),
        ("fd00:18::1", 4433, 1, "fd00:18::2", 4433, 1, False),
    ],
)
def test_listen_port_collisions(
    a_local: str, a_port: int, a_queues: int, b_local: str, b_port: int, b_queues: int, collide: bool
) -> None:
    a = underlay(office(queues=a_queues), local=a_local, port=a_port, ports="per-queue")
    b = underlay(lab(role="listen", queues=b_queues), local=b_local, port=b_port, peer=DELETE, ports="per-queue")
    data = config({"a": a, "b": b})
    if collide:
        error = assert_only_error(data, "networks.b.underlay.port", "networks.a.underlay")
        assert "collide" in error
    else:
        assert len(parse_config(data).networks) == 2


def test_connect_networks_may_share_ports() -> None:
    b = lab(local_ipv6="fd00:19:2::1/64", peer_ipv6="fd00:19:2::2/64", peer_key=KEY_C)
    cfg = parse_config(config({"a": lab(), "b": b}))
    assert cfg.networks[0].underlay == cfg.networks[1].underlay


def test_disabled_networks_are_still_cross_checked() -> None:
    b = lab(enabled=False, interface="l3p-a")
    assert_only_error(config({"a": office(), "b": b}), "networks.b.interface", "already used")


# -- peer key, node id, names, paths ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must be 'SHA256:'"),
        ("AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34", "must be 'SHA256:'"),
        ("sha256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34", "must be 'SHA256:'"),
        ("SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn3", "must be 'SHA256:'"),
        ("SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34=", "must be 'SHA256:'"),
        ("SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34A", "must be 'SHA256:'"),
        ("SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn3_", "must be 'SHA256:'"),
        ("SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn35", "canonical base64"),
        ("SHA512:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34", "must be 'SHA256:'"),
    ],
)
def test_invalid_peer_key(value: str, message: str) -> None:
    assert_only_error(config({"office": office(peer_key=value)}), "networks.office.peer_key", message)


@pytest.mark.parametrize("value", [KEY_A, KEY_C, "SHA256:" + "A" * 43, "SHA256:" + "/" * 42 + "w"])
def test_valid_peer_keys(value: str) -> None:
    assert parse_net(office(peer_key=value)).peer_key == value


@pytest.mark.parametrize("value", ["", "bad id", "a/b", "é", "a" * (NODE_ID_MAX + 1)])
def test_invalid_node_id(value: str) -> None:
    assert_only_error(config(node={"id": value, "key_file": "/k"}), "node.id", f"1..{NODE_ID_MAX} characters")


@pytest.mark.parametrize("value", ["a", "Alpha-1.b_c", "a" * NODE_ID_MAX])
def test_valid_node_id(value: str) -> None:
    assert parse_config(config(node={"id": value, "key_file": "/k"})).node.id == value


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Office", "invalid network name"),
        ("-office", "invalid network name"),
        ("_office", "invalid network name"),
        ("off.ice", "invalid network name"),
        ("a" * (NETWORK_NAME_MAX + 1), "invalid network name"),
    ],
)
def test_invalid_network_names(name: str, message: str) -> None:
    data = config({name: office(interface="l3p-x")})
    path = f"networks.{name}"
    if "." in name:
        path = f'networks."{name}"'
    assert_only_error(data, path, message)


def test_non_string_network_name() -> None:
    assert_only_error(config({1: office()}), "networks", "network name 1 is not a string")


def test_network_name_with_space_is_quoted_in_path() -> None:
    assert_only_error(config({"my net": office(interface="l3p-x")}), 'networks."my net"', "invalid network name")


@pytest.mark.parametrize("name", ["0", "a_b-c", "a" * NETWORK_NAME_MAX])
def test_valid_network_names(name: str) -> None:
    assert parse_net(office(interface="l3p-x"), name).name == name


def test_too_many_networks() -> None:
    nets = {}
    for i in range(MAX_NETWORKS + 1):
        nets[f"n{i}"] = {
            "role": "connect",
            "local_ipv6": f"fd00:19:{i:x}::1/64",
            "peer_ipv6": f"fd00:19:{i:x}::2/64",
            "peer_key": KEY_A,
            "underlay": {"peer": "198.18.0.2", "port": 4433},
        }
    assert_only_error(config(nets), "networks", f"at most {MAX_NETWORKS}")
    del nets[f"n{MAX_NETWORKS}"]
    assert len(parse_config(config(nets)).networks) == MAX_NETWORKS


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (config(node={"id": "a", "key_file": "node.key"}), "node.key_file", "not an absolute path"),
        (config(node={"id": "a", "key_file": ""}), "node.key_file", "must not be empty"),
        (config(node={"id": "a", "key_file": "/k\0"}), "node.key_file", "NUL"),
        (config(controller={"runtime_dir": "run/l3ptp"}), "controller.runtime_dir", "not an absolute path"),
        (config(controller={"runtime_dir": ""}), "controller.runtime_dir", "must not be empty"),
        (config(controller={"helper_socket": "helper.sock"}), "controller.helper_socket", "not an absolute path"),
        (config({"office": office(key_file="office.key")}), "networks.office.key_file", "not an absolute path"),
    ],
)
def test_paths_must_be_absolute(data: dict[str, Any], path: str, message: str) -> None:
    assert_only_error(data, path, message)


@pytest.mark.parametrize("key", ["worker_user", "admin_group"])
@pytest.mark.parametrize("value", ["Root", "a b", "1user", "a:b", "-x", "a" * 65])
def test_invalid_account_names(key: str, value: str) -> None:
    assert_only_error(config(controller={key: value}), f"controller.{key}", "not a valid user or group name")


@pytest.mark.parametrize("key", ["worker_user", "admin_group"])
@pytest.mark.parametrize("value", ["", "l3ptp", "_l3ptp", "nobody", "machine$"])
def test_valid_account_names(key: str, value: str) -> None:
    assert getattr(parse_config(config(controller={key: value})).controller, key) == value


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1:9586", "", "127.0.0.0/8"])
def test_invalid_metrics_address(value: str) -> None:
    assert_only_error(config(metrics={"address": value}), "metrics.address", "not a valid IP address")


@pytest.mark.parametrize("value", ["invalid", "both", "LISTEN", ""])
def test_invalid_role(value: str) -> None:
    data = config({"office": office(role=value)})
    assert_only_error(data, "networks.office.role", "is not one of 'listen', 'connect'")


# -- convenience methods ---------------------------------------------------------------------------


def dual_stack() -> NetworkConfig:
    return parse_net(
        office(
            local_ipv6="fd00:19::1/64",
            peer_ipv6="fd00:19::2/64",
            queues=3,
            advertised_routes=["fd00:19:10::/64", "198.19.10.0/24"],
            accepted_routes=["198.19.20.0/24", "fd00:19:20::/64"],
            allowed_sources=["198.19.30.0/24", "198.19.20.0/24"],
        )
    )


def test_addresses_ipv4_first() -> None:
    net = dual_stack()
    assert net.addresses() == (IFACE("198.19.0.1/24"), IFACE("fd00:19::1/64"))
    assert net.peer_addresses() == (IFACE("198.19.0.2/24"), IFACE("fd00:19::2/64"))


def test_local_sources() -> None:
    assert dual_stack().local_sources() == (
        NET("198.19.0.1/32"),
        NET("fd00:19::1/128"),
        NET("fd00:19:10::/64"),
        NET("198.19.10.0/24"),
    )


def test_peer_sources_deduplicated() -> None:
    assert dual_stack().peer_sources() == (
        NET("198.19.0.2/32"),
        NET("fd00:19::2/128"),
        NET("198.19.20.0/24"),
        NET("fd00:19:20::/64"),
        NET("198.19.30.0/24"),
    )


def test_sources_of_single_stack_network() -> None:
    net = parse_net(lab(), "lab")
    assert net.local_sources() == (NET("fd00:19:1::1/128"),)
    assert net.peer_sources() == (NET("fd00:19:1::2/128"),)


def test_key_path() -> None:
    node = NodeConfig(id="alpha", key_file="/etc/l3ptp/node.key")
    assert parse_net(office()).key_path(node) == "/etc/l3ptp/node.key"
    assert parse_net(office(key_file="/etc/l3ptp/office.key")).key_path(node) == "/etc/l3ptp/office.key"


def test_queue_port() -> None:
    net = dual_stack()
    assert [net.queue_port(k) for k in range(net.queues)] == [4433, 4433, 4433]  # shared, the default
    per_queue = dataclasses.replace(net, underlay=dataclasses.replace(net.underlay, ports="per-queue"))
    assert [per_queue.queue_port(k) for k in range(net.queues)] == [4433, 4434, 4435]
    for bad in (-1, 3, True):
        with pytest.raises(ValueError, match="outside 0..2"):
            net.queue_port(bad)


def test_dataclass_defaults_match_schema_defaults() -> None:
    cfg = parse_config(config())
    assert cfg.controller == ControllerConfig()
    assert cfg.metrics == MetricsConfig()
    assert Config(node=cfg.node, networks=cfg.networks) == cfg


@pytest.mark.parametrize(
    "cls", [NodeConfig, ControllerConfig, MetricsConfig, NetworkConfig, UnderlayConfig], ids=lambda c: c.__name__
)
def test_every_key_is_documented(cls: type) -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(cls):
        if field.name != "name":
            assert f"| `{field.name}` |" in text, field.name



@pytest.mark.parametrize(("key", "default", "other", "bad"),
                         [("engine", "auto", "qh3", "quiche"), ("offload", "gro", "auto", "on"),
                          ("offload", "gro", "off", "tso")])
def test_choice_key_has_its_default_and_is_checked(key: str, default: str, other: str, bad: str) -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    assert getattr(parse_config(doc).networks[0], key) == default
    doc["networks"]["office"][key] = other
    assert getattr(parse_config(doc).networks[0], key) == other
    doc["networks"]["office"][key] = bad
    with pytest.raises(ConfigError, match=key):
        parse_config(doc)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cpus", [0, -1], "cpus[1]: expected a CPU number"),
        ("cpus", [True], "cpus[0]: expected a CPU number"),
        ("cpus", "0,1", "expected a list of CPU numbers"),
        ("event_loop", "trio", "'trio' is not one of"),
    ],
)
def test_cpus_and_event_loop_are_checked(key: str, value: Any, message: str) -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    doc["networks"]["office"][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(doc)


def test_cpus_and_event_loop_parse() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    doc["networks"]["office"] |= {"cpus": [1, 0], "event_loop": "uvloop"}
    net = parse_config(doc).networks[0]
    assert net.cpus == (1, 0) and net.event_loop == "uvloop"
