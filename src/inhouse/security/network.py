"""Client addresses and IP allow-lists. ``X-Forwarded-For`` is believed only when the peer is
a configured trusted proxy, and then only up to the first hop that is not one."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=4096)  # per request on the hot path; the same few peers recur
def parse_address(text: str) -> Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@lru_cache(maxsize=4096)
def address_text(addr: Address) -> str:
    return str(addr)


def in_networks(addr: Address | None, networks: Sequence[Network]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


class ClientAddressResolver:
    def __init__(self, trusted_proxies: Sequence[Network]) -> None:
        self._trusted = tuple(trusted_proxies)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> Address | None:
        """The client's address: the peer, or — when the peer is a trusted proxy — the right-most
        address in X-Forwarded-For that is not itself a trusted proxy."""
        addr = parse_address(peer) if peer else None
        if not forwarded_for or not self._trusted or not in_networks(addr, self._trusted):
            return addr
        for hop in reversed(forwarded_for.split(",")):
            hop_addr = parse_address(hop)
            if hop_addr is None:
                return addr  # a malformed hop: stop believing the header there
            addr = hop_addr
            if not in_networks(hop_addr, self._trusted):
                break
        return addr
