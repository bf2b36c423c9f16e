"""Trusted proxies: who names the caller, and how far to the left of X-Forwarded-For the server believes."""

from __future__ import annotations

import pytest

from server.config import Settings, load_settings
from server.proxies import MAX_HOPS, Proxies


@pytest.mark.parametrize(
    ("peer", "forwarded", "caller"),
    [
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # not a proxy: its header is the caller's own text
        ("10.0.0.5", [], "10.0.0.5"),  # a proxy that names no one is the caller
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # what the caller wrote to the left is not believed
        ("10.0.0.5", ["198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # two trusted hops
        ("10.0.0.5", ["198.51.100.1", "10.0.0.7"], "198.51.100.1"),  # the same, as two header lines
        ("10.0.0.5", ["198.51.100.1, garbage, 10.0.0.7"], "10.0.0.7"),  # not an address: the last trusted hop
        ("10.0.0.5", [" ::ffff:198.51.100.1 "], "198.51.100.1"),  # an IPv4 address mapped into IPv6
        ("10.0.0.5", ["2001:db8::1"], "2001:db8::1"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
    ],
)
def test_the_caller_is_the_first_untrusted_address_from_the_right(peer: str, forwarded: list[str], caller: str) -> None:
    assert Proxies("10.0.0.0/8, 192.168.1.7").caller(peer, forwarded) == caller


def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert Proxies().caller("10.0.0.5", ["198.51.100.1"]) == "10.0.0.5"
    assert Proxies("").networks == ()


def test_a_chain_longer_than_the_hops_read_ends_at_a_trusted_hop() -> None:
    chain = ", ".join(["198.51.100.1"] + ["10.0.0.9"] * MAX_HOPS)
    assert Proxies("10.0.0.0/8").caller("10.0.0.5", [chain]) == "10.0.0.9"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "proxy.internal", "10.0.0.1,,nope"])
def test_a_bad_entry_ends_the_start_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match=r"trusted_proxies: .* is not an address or a network"):
        Settings(trusted_proxies=bad)
    with pytest.raises(SystemExit, match="not an address or a network"):
        load_settings([], {"TRUSTED_PROXIES": bad})
