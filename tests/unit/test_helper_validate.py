from __future__ import annotations

import pytest

from l3ptp.helper.policy import PolicyRefused, check_address, check_ifname, check_mtu, check_prefix
from l3ptp.ipc.errors import ErrorCode
from tests.support.helper_fixtures import make_policy


@pytest.mark.parametrize("name", ["l3p-a", "l3p-0", "l3p-abcdefghijk"])
def test_good_ifnames(name: str) -> None:
    assert check_ifname(name, "l3p-") == name


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("eth0", ErrorCode.OUT_OF_POLICY),
        ("l3p-", ErrorCode.OUT_OF_POLICY),
        ("xl3p-a", ErrorCode.OUT_OF_POLICY),
        ("l3p-abcdefghijkl", ErrorCode.BAD_REQUEST),  # 16 chars
        ("l3p-a/b", ErrorCode.BAD_REQUEST),
        ("l3p-a b", ErrorCode.BAD_REQUEST),
        ("l3p-A", ErrorCode.BAD_REQUEST),
        ("l3p-\x00", ErrorCode.BAD_REQUEST),
        ("", ErrorCode.BAD_REQUEST),
        ("..", ErrorCode.BAD_REQUEST),
    ],
)
def test_bad_ifnames(name: str, code: ErrorCode) -> None:
    with pytest.raises(PolicyRefused) as info:
        check_ifname(name, "l3p-")
    assert info.value.code is code


@pytest.mark.parametrize("mtu", [576, 1280, 9000])
def test_mtu_ok(mtu: int) -> None:
    assert check_mtu(mtu) == mtu


@pytest.mark.parametrize("mtu", [575, 9001, 0, -1, True])
def test_mtu_bad(mtu: int) -> None:
    with pytest.raises(PolicyRefused):
        check_mtu(mtu)


def test_prefixes_inside_policy() -> None:
    p = make_policy()
    assert str(check_prefix("198.19.4.0/24", p, allow_default=False)) == "198.19.4.0/24"
    assert str(check_prefix("fd00:1::/64", p, allow_default=False)) == "fd00:1::/64"


@pytest.mark.parametrize("prefix", ["198.18.0.0/24", "198.0.0.0/8", "10.0.0.0/8", "fe80::/64", "198.19.0.1/24", "x"])
def test_prefixes_outside_policy_or_bad(prefix: str) -> None:
    with pytest.raises(PolicyRefused):
        check_prefix(prefix, make_policy(), allow_default=True)


def test_default_route_needs_both_policy_and_request() -> None:
    assert check_prefix("0.0.0.0/0", make_policy(), allow_default=True).prefixlen == 0
    assert check_prefix("::/0", make_policy(), allow_default=True).prefixlen == 0
    for policy, request in [(True, False), (False, True), (False, False)]:
        with pytest.raises(PolicyRefused) as info:
            check_prefix("0.0.0.0/0", make_policy(allow_default_route=policy), allow_default=request)
        assert info.value.code is ErrorCode.OUT_OF_POLICY


def test_addresses() -> None:
    p = make_policy()
    assert str(check_address("198.19.1.1/24", p)) == "198.19.1.1/24"
    for bad in ["198.18.1.1/24", "198.19.1.1/8", "198.19.1.1/0", "nonsense"]:
        with pytest.raises(PolicyRefused):
            check_address(bad, p)
