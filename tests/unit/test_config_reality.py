"""``[networks.<name>.reality]`` (controller/config/reality.py), `l3ptp keygen --reality` and what reaches the
worker (controller/worker_config.py): issue 15's configuration."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import pytest

from l3ptp.controller import cli
from l3ptp.controller.config import ConfigError, RealityConfig, parse_config
from l3ptp.controller.config.reality import hostname
from l3ptp.controller.worker_config import build_worker_config, load_reality_key_raw
from l3ptp.worker import keys
from tests.support.config_builders import config, lab, office

PUB = base64.b64encode(bytes(range(32))).decode()


def errors(net: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config({"n": net}))
    return list(info.value.errors)


def reality_of(net: dict[str, Any]) -> RealityConfig | None:
    return parse_config(config({"n": net})).networks[0].reality


def test_a_listener_and_a_connector_credential() -> None:
    r = reality_of(office(reality={"private_key_file": "/etc/l3ptp/reality.key", "short_ids": ["a1b2", ""],
                                   "camouflage": "www.site.test:443"}))
    assert r == RealityConfig(private_key_file="/etc/l3ptp/reality.key", short_ids=(b"\xa1\xb2", b""),
                              camouflage_host="www.site.test", camouflage_port=443)
    r = reality_of(lab(reality={"public_key": PUB, "short_ids": ["a1b2"], "camouflage": "www.site.test:443"}))
    assert r is not None and r.public_key == bytes(range(32)) and r.short_ids == (b"\xa1\xb2",)
    assert r.server_name == "www.site.test" and r.camouflage_host == ""  # the SNI comes from the camouflage
    r = reality_of(lab(reality={"public_key": PUB, "camouflage": "www.site.test:443", "server_name": "cdn.test"}))
    assert r is not None and r.server_name == "cdn.test"
    assert reality_of(office()) is None  # no table: REALITY off
    r = reality_of(office(reality={"private_key_file": "/k", "camouflage": "[2001:db8::1]:8443"}))
    assert r is not None and (r.camouflage_host, r.camouflage_port) == ("2001:db8::1", 8443)


@pytest.mark.parametrize("net, path, fragment", [
    (office(reality={}), "reality.private_key_file", "required for role 'listen'"),
    (lab(reality={}), "reality.public_key", "required for role 'connect'"),
    (lab(reality={"public_key": PUB, "private_key_file": "/k"}), "reality.private_key_file", "is for role 'listen'"),
    (office(reality={"private_key_file": "/k", "public_key": PUB}), "reality.public_key", "is for role 'connect'"),
    (office(reality={"private_key_file": "/k", "server_name": "x.test"}), "reality.server_name", "for role 'connect'"),
    (lab(reality={"public_key": "AAAA"}), "reality.public_key", "not 32 bytes in base64"),
    (lab(reality={"public_key": PUB + "!"}), "reality.public_key", "not 32 bytes in base64"),
    (lab(reality={"public_key": PUB, "short_ids": ["01", "02"]}), "reality.short_ids", "at most one"),
    (office(reality={"private_key_file": "/k", "short_ids": ["a1b"]}), "reality.short_ids[0]", "even number of hex"),
    (office(reality={"private_key_file": "/k", "short_ids": ["00" * 9]}), "reality.short_ids[0]", "at most 16"),
    (office(reality={"private_key_file": "/k", "short_ids": ["01", "01"]}), "reality.short_ids", "twice"),
    (office(reality={"private_key_file": "/k", "short_ids": ["%02x" % i for i in range(17)]}), "reality.short_ids",
     "at most 16"),
    (office(reality={"private_key_file": "/k", "camouflage": "www.site.test"}), "reality.camouflage", "host:port"),
    (office(reality={"private_key_file": "/k", "camouflage": "www..test:443"}), "reality.camouflage",
     "neither an IP address nor a DNS name"),
    (office(reality={"private_key_file": "/k", "camouflage": "1.2.3:443"}), "reality.camouflage", "not a valid IP"),
    (office(reality={"private_key_file": "/k", "camouflage": "x.test:0"}), "reality.camouflage", "outside 1..65535"),
    (office(reality={"private_key_file": "relative"}), "reality.private_key_file", "absolute"),
    (office(reality={"private_key_file": "/k", "shortids": []}), "reality", "unknown key 'shortids'"),
    (office(reality="yes"), "reality", "a table"),
])
def test_bad_reality_tables_are_refused_by_key(net: dict[str, Any], path: str, fragment: str) -> None:
    found = errors(net)
    assert any(e.startswith(f"networks.n.{path}: ") and fragment in e for e in found), found


@pytest.mark.parametrize("text, problem", [("www.site.test", None), ("198.18.0.1", None), ("fd00::1", None),
                                           ("a" * 64 + ".test", "neither"), ("-a.test", "neither"), ("", "1..253"),
                                           ("1.2.3.4.5", "not a valid IP"), ("host_name.test", "neither")])
def test_hostnames(text: str, problem: str | None) -> None:
    got = hostname(text)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_keygen_reality_writes_a_key_the_controller_reads_and_prints_its_public_key(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "reality.key"
    assert cli.main(["keygen", "--reality", "--out", str(path)], out=out, err=err) == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    raw = load_reality_key_raw(str(path))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert out.getvalue().strip() == base64.b64encode(public).decode()
    # A node key is not a REALITY key: refused with a reason.
    node = tmp_path / "node.key"
    keys.save_private_key(keys.generate_private_key(), node)
    with pytest.raises(keys.BadKey, match="not an X25519 key"):
        load_reality_key_raw(str(node))


def test_the_worker_gets_the_credential_of_its_role() -> None:
    cfg = parse_config(config({
        "office": office(reality={"private_key_file": "/etc/l3ptp/reality.key", "short_ids": ["a1b2"],
                                  "camouflage": "www.site.test:443"}),
        "lab": lab(reality={"public_key": PUB, "short_ids": ["a1b2"], "camouflage": "www.site.test:443"}),
        "plain": office(local_ipv4="198.19.5.1/24", peer_ipv4="198.19.5.2/24", underlay={"local": "198.18.0.1",
                                                                                         "port": 5433})}))
    loaded: list[str] = []

    def build(name: str):  # type: ignore[no-untyped-def]
        net = cfg.network(name)
        assert net is not None
        return build_worker_config(cfg, net, 0, "t" * 32, bus_path="/run/x/workers.sock",
                                   key_loader=lambda path: bytes(32),
                                   reality_key_loader=lambda path: loaded.append(path) or b"\x07" * 32)

    w = build("office")
    assert w.reality_key == b"\x07" * 32 and loaded == ["/etc/l3ptp/reality.key"]
    assert (w.camouflage_host, w.camouflage_port, w.reality_short_ids, w.server_name) == (
        "www.site.test", 443, (b"\xa1\xb2",), "")
    w = build("lab")
    assert w.reality_key == bytes(range(32)) and w.server_name == "www.site.test" and w.camouflage_host == ""
    w = build("plain")
    assert w.reality_key == b"" and w.camouflage_host == "" and w.reality_short_ids == ()
    from l3ptp.ipc.codec import Channel  # noqa: F401  (the config must still encode within its cap)
    from l3ptp.ipc.control_messages import WorkerConfig

    assert isinstance(w, WorkerConfig)


def test_status_shows_a_reality_listeners_line_and_nothing_without_reality() -> None:
    line = cli._reality({"reality_passed": 2, "reality_refused_bad_tag": 5, "reality_refused_replay": 1,
                         "relay_flows": 6, "relay_flows_open": 3, "relay_up_packets": 40, "relay_down_packets": 30,
                         "relay_full": 4, "reality_pending_senders": 0})
    assert line == ("passed 2; refused bad_tag 5, replay 1; relayed flows 6 (open 3, up 40 / down 30 packets); "
                    "not relayed: relay_full 4")
    assert cli._reality({"dgram_rx_packets": 5}) == ""
