"""Refuse downloads from private, loopback, link-local and other non-public addresses (SSRF guard).

Two checks, both needed: ``check_url`` runs before every request *and every redirect hop* (it resolves the
host itself and refuses if any address is not public, so an IP-literal URL is caught too — aiohttp never
asks a resolver about IP literals); ``GuardedResolver`` is the connector's resolver, so the address the
socket actually connects to passed the same test (no DNS-rebinding gap between check and connect).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.resolver import DefaultResolver


class BlockedAddressError(OSError):
    """The URL's host is, or resolves to, an address the config does not allow."""


class BadUrlError(ValueError):
    """Not an http(s) URL with a host."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _allowed(address: str, networks: tuple[str, ...]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return is_public(address) or any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def _check_addresses(host: str, addresses: list[str], networks: tuple[str, ...] = ()) -> None:
    blocked = [a for a in addresses if not _allowed(a, networks)]
    if blocked:
        raise BlockedAddressError(
            f"{host} resolves to non-public address {blocked[0]} (private/loopback/link-local); "
            "allow it with stages.images.download.allowed_networks (CIDRs) or allow_private_addresses: true"
        )


async def check_url(url: str, *, allow_private: bool, networks: tuple[str, ...] = ()) -> None:
    """Raise ``BadUrlError`` or ``BlockedAddressError`` before anything is sent to ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadUrlError(f"{url!r} is not an http(s) URL with a host")
    if allow_private:
        return
    host = parts.hostname
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
    _check_addresses(host, addresses, networks)


class GuardedResolver(DefaultResolver):
    """aiohttp resolver that refuses hosts resolving to non-public addresses (unless allowed)."""

    def __init__(self, *args, allow_private: bool = False, networks: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_private = allow_private
        self.networks = tuple(networks)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await super().resolve(host, port, family)
        if not self.allow_private:
            _check_addresses(host, [r["host"] for r in results], self.networks)
        return results
