"""The addresses a `discover` entry names: its host's A and AAAA records, looked up over DNS.

    addresses = await DnsResolver().addresses("comfyui-gpu.style.svc.cluster.local")

dnspython's asyncio resolver: pure Python (no C library to build), typed, and its
nameservers and their ports are settings, so tests point it at a DNS server on loopback.
With none given it reads the system's configuration (/etc/resolv.conf: nameservers, search
domains, ndots), as a pod's own resolver would. It keeps no cache: each look-up asks the
server, so the pool follows the records within one discovery interval. (The system's
`getaddrinfo` cannot be pointed at a test server; aiodns would add c-ares, a C extension.)

An authoritative "no such name" or "no such record" is an answer: no address. A timeout,
SERVFAIL or a missing resolver configuration is no answer: `DiscoveryFailed`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from consumer.errors import DiscoveryFailed
from consumer.settings import nameserver_address


class Resolver(Protocol):
    """Look up the addresses of a host name."""

    async def addresses(self, host: str) -> list[str]:
        """Its IPv4 and IPv6 addresses, sorted; raises DiscoveryFailed when there is no answer."""
        ...


class DnsResolver:
    """A and AAAA look-ups through `nameservers` (`ip` or `ip:port`), else the system's."""

    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 5.0) -> None:
        self._nameservers = [nameserver_address(n) for n in nameservers]
        self._timeout_s = timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None

    def __repr__(self) -> str:
        where = ", ".join(f"{ip}:{port}" for ip, port in self._nameservers) or "system"
        return f"<DnsResolver {where}>"

    async def addresses(self, host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]  # a literal needs no look-up
        except ValueError:
            pass
        resolver = await self._ready()
        found = await asyncio.gather(
            self._query(resolver, host, "A"), self._query(resolver, host, "AAAA")
        )
        return sorted({address for addresses in found for address in addresses})

    async def _ready(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = await asyncio.to_thread(self._build)  # reads /etc/resolv.conf
        return self._resolver

    def _build(self) -> dns.asyncresolver.Resolver:
        try:
            resolver = dns.asyncresolver.Resolver(configure=not self._nameservers)
        except dns.exception.DNSException as exc:
            raise DiscoveryFailed(f"no DNS resolver configuration: {exc}") from exc
        if self._nameservers:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in self._nameservers
            ]
        resolver.cache = None
        return resolver

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, host: str, rdtype: str
    ) -> list[str]:
        try:
            answer = await resolver.resolve(
                host, rdtype, search=True, raise_on_no_answer=False, lifetime=self._timeout_s
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise DiscoveryFailed(f"DNS {rdtype} look-up of {host} failed: {exc}") from exc
        return [rdata.to_text() for rdata in answer.rrset] if answer.rrset is not None else []
