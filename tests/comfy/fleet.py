"""A GPU fleet on loopback: emulators on 127.0.0.x sharing one port, and a DNS server for them.

Linux routes all of 127/8 to `lo`, so each emulator gets an address of its own, like the
pods behind a Kubernetes headless Service; `LoopbackDns` (dnslib, in a thread) answers A and
AAAA queries from records a test changes at any time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from consumer.testing.comfyui_emulator import ComfyEmulator, Faults

PORT_TRIES = 5


class Records(BaseResolver):
    """A and AAAA records by name; NXDOMAIN for other names; SERVFAIL while `failing`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[str]] = {}
        self._failing = False
        self.queries = 0

    def set(self, name: str, addresses: Sequence[str]) -> None:
        with self._lock:
            self._records[name.rstrip(".").lower()] = list(addresses)

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(name.rstrip(".").lower(), None)

    def fail(self, failing: bool = True) -> None:
        with self._lock:
            self._failing = failing

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:  # noqa: ARG002 - dnslib's signature
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self._lock:
            self.queries += 1
            failing, addresses = self._failing, self._records.get(name)
        if failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for address in addresses:
                self._answer(reply, request, address)
        return reply

    @staticmethod
    def _answer(reply: DNSRecord, request: DNSRecord, address: str) -> None:
        version = ipaddress.ip_address(address).version
        qtype = QTYPE[request.q.qtype]
        if qtype == "A" and version == 4:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        elif qtype == "AAAA" and version == 6:
            reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=1))


@contextlib.contextmanager
def loopback_dns() -> Iterator[tuple[Records, str]]:
    """A DNS server on 127.0.0.1 (a free UDP port): its records and its `ip:port`."""
    records = Records()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False)
    server = DNSServer(records, address="127.0.0.1", port=0, logger=quiet)
    server.start_thread()
    try:
        yield records, f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


@contextlib.asynccontextmanager
async def emulators_on(
    hosts: Sequence[str], root: Path, faults: Faults | None = None
) -> AsyncIterator[tuple[list[ComfyEmulator], int]]:
    """One emulator per host address, all on one free port (as pods of one Service)."""
    for _ in range(PORT_TRIES):
        emulators = [
            ComfyEmulator(replace(faults or Faults()), output_dir=root / host) for host in hosts
        ]
        try:
            port = await _start_all(emulators, hosts)
        except OSError:  # the port was taken on another address: try another one
            for emulator in emulators:
                await emulator.stop()
            continue
        try:
            yield emulators, port
        finally:
            for emulator in emulators:
                await emulator.stop()
        return
    raise RuntimeError(f"no port free on all of {', '.join(hosts)}")


async def _start_all(emulators: Sequence[ComfyEmulator], hosts: Sequence[str]) -> int:
    await emulators[0].start(hosts[0], 0)
    port = int(emulators[0].url.rsplit(":", 1)[1])
    for emulator, host in zip(emulators[1:], hosts[1:], strict=True):
        await emulator.start(host, port)
    return port
