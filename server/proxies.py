"""Who the caller is behind a proxy: trusted proxies name it in X-Forwarded-For; anyone else is their address.

The per-caller bounds (calls, receive slots) and the per-address connection
cap key on the caller. Behind a load balancer or a Kubernetes Service that
source-NATs, every peer is the proxy, so all callers would share one budget.
`--trusted-proxies` names the proxies (addresses or CIDR networks) whose
`X-Forwarded-For` is believed: the HTTP header, or the gRPC metadata entry
of the same name. The list is read from its right end, where the nearest
proxy appended the address it saw: each trusted hop is stepped over, and the
first address that is not a trusted proxy is the caller. An entry that is
not an address ends the walk at the last trusted hop, so a caller cannot
choose its identity by writing garbage or addresses to the left.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32
"""Forwarded entries read from the right end at most: a longer chain is no one's real path."""


def proxy_networks(text: str) -> tuple[Network, ...]:
    """The networks of a comma-separated list of addresses and CIDRs; `ValueError` names a bad entry."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry[:60]!r} is not an address or a network "
                "(e.g. 10.0.0.0/8, 192.168.1.7, fd00::/8)"
            ) from None
    return tuple(networks)


def normalized_address(host: str) -> str:
    """A caller's IP address as one string per caller: an IPv4 address mapped into IPv6 is the IPv4 one;
    anything that is not an address is itself."""
    address = _address(host)
    return host if address is None else str(address)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class Proxies:
    """The trusted proxies of `--trusted-proxies`, and the caller a call names through them."""

    def __init__(self, text: str = "") -> None:
        self.networks = proxy_networks(text)

    def trusts(self, peer: str) -> bool:
        address = _address(peer)
        return address is not None and any(address in network for network in self.networks)

    def caller(self, peer: str, forwarded: Iterable[str]) -> str:
        """The caller of a call from `peer` (an address) carrying `forwarded` (X-Forwarded-For values, in order)."""
        if not self.trusts(peer):
            return peer
        hops = [hop for value in forwarded for hop in value.split(",")][-MAX_HOPS:]
        caller = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break
            caller = str(address)
            if not self.trusts(caller):
                break
        return caller
