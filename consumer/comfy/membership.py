"""Which ComfyUI instances the pool should have, re-read every `interval_s`.

    membership = Membership(pool, settings.instances(), file=InstancesFile(path),
                            resolver=DnsResolver(), interval_s=10)
    group.create_task(membership.run())          # refresh, reconcile the pool, sleep, again

Sources: the static list (COMFYUI_INSTANCES) and COMFYUI_INSTANCES_FILE, a JSON (`.json`)
or YAML list in the same format, read again at every refresh (a Kubernetes ConfigMap
volume swaps its files through a symlink, which a stat() of the path follows but a file
watcher misses; the file is small, so it is read and compared by its SHA-256). An
unreadable or invalid file keeps its last good list, logged once per new content or error.

An entry with `"discover": true` names a DNS name whose A/AAAA records are the instances
(a Kubernetes headless Service): each address becomes an instance named
`<name or host>/<ip>:<port>` at `http://<ip>:<port>` (`[v6]` for IPv6), with the entry's
max_concurrency. A look-up that fails keeps the entry's last addresses; an answer of "no
such name" means none (every instance of that entry drains).

The pool joins new instances and drains removed ones (consumer/comfy/members.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import TypeAdapter, ValidationError

from consumer.comfy.resolver import Resolver
from consumer.errors import DiscoveryFailed
from consumer.settings import ComfyInstanceSettings

log = logging.getLogger(__name__)
DEFAULT_PORTS = {"http": 80, "https": 443}
_ENTRIES = TypeAdapter(list[ComfyInstanceSettings])


class Target(Protocol):
    """What follows the membership: the pool."""

    def reconcile(self, desired: Sequence[ComfyInstanceSettings]) -> None: ...


def parse_entries(
    data: bytes, *, yaml_text: bool = True, max_concurrency: int = 2
) -> list[ComfyInstanceSettings]:
    """A list in the COMFYUI_INSTANCES format (URL strings or objects); entries without a
    max_concurrency get `max_concurrency`. Raises ValueError when it is not one."""
    try:
        items: Any = yaml.safe_load(data) if yaml_text else json.loads(data)
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"not {'YAML' if yaml_text else 'JSON'}: {exc}") from exc
    rows = (
        [{"url": i} if isinstance(i, str) else i for i in items]
        if isinstance(items, list)
        else items
    )
    try:
        entries = _ENTRIES.validate_python(rows)  # a list of URLs or objects, or a ValueError
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc
    return [
        e
        if "max_concurrency" in e.model_fields_set
        else e.model_copy(update={"max_concurrency": max_concurrency})
        for e in entries
    ]


def expand(entry: ComfyInstanceSettings, addresses: Sequence[str]) -> list[ComfyInstanceSettings]:
    """One instance per address of a `discover` entry, named `<name or host>/<ip>:<port>`."""
    parts = urlsplit(entry.url)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    prefix = entry.name or parts.hostname
    credentials = parts.netloc.rpartition("@")[0]
    instances = []
    for address in addresses:
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        netloc = f"{credentials}@{where}" if credentials else where
        url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        instances.append(
            ComfyInstanceSettings(
                url=url, name=f"{prefix}/{where}", max_concurrency=entry.max_concurrency
            )
        )
    return instances


class InstancesFile:
    """COMFYUI_INSTANCES_FILE: its last good list; `ok` is False while unreadable or invalid."""

    def __init__(self, path: Path, max_concurrency: int = 2) -> None:
        self.path = path
        self.entries: list[ComfyInstanceSettings] = []
        self._max_mc = max_concurrency
        self._digest: bytes | None = None
        self._content_ok = False
        self._read_error: str | None = None

    def __repr__(self) -> str:
        return f"<InstancesFile {self.path} entries={len(self.entries)} ok={self.ok}>"

    @property
    def ok(self) -> bool:
        """The last read worked and its content was valid."""
        return self._read_error is None and self._content_ok

    async def read(self) -> list[ComfyInstanceSettings]:
        """Read the file again; its entries, or the last good ones."""
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            self._unreadable(f"{type(exc).__name__}: {exc.strerror or exc}")
            return self.entries
        self._read_error = None
        digest = hashlib.sha256(data).digest()
        if digest != self._digest:
            self._digest = digest
            self._parse(data)
        return self.entries

    def _parse(self, data: bytes) -> None:
        yaml_text = self.path.suffix.lower() != ".json"
        try:
            entries = parse_entries(data, yaml_text=yaml_text, max_concurrency=self._max_mc)
        except ValueError as exc:
            error = str(exc)
        else:
            log.info("instance file %s lists %d instance(s)", self.path, len(entries))
            self.entries, self._content_ok = entries, True
            return
        log.error("instance file %s is invalid, keeping its last good list: %s", self.path, error)
        self._content_ok = False

    def _unreadable(self, error: str) -> None:
        if error != self._read_error:
            log.error("cannot read instance file %s, keeping its last list: %s", self.path, error)
        self._read_error = error


class Membership:
    """Sources to the desired instances, at every `refresh()`; the target follows."""

    def __init__(
        self,
        target: Target,
        static: Sequence[ComfyInstanceSettings],
        *,
        resolver: Resolver,
        file: InstancesFile | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self._target = target
        self._static = list(static)
        self._resolver = resolver
        self._file = file
        self._interval_s = interval_s
        self._found: dict[ComfyInstanceSettings, list[ComfyInstanceSettings]] = {}
        self._failed: dict[ComfyInstanceSettings, str] = {}  # entry -> its last error

    def __repr__(self) -> str:
        return f"<Membership static={len(self._static)} file={self._file!r} dns={len(self._found)}>"

    def sources_ok(self) -> dict[str, bool]:
        """Whether the last read of each source in use succeeded: "file", "dns"."""
        ok = {} if self._file is None else {"file": self._file.ok}
        if any(e.discover for e in self._entries()):
            ok["dns"] = not self._failed
        return ok

    async def run(self) -> None:
        """Refresh until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)

    async def refresh(self) -> list[ComfyInstanceSettings]:
        """Read every source, hand the desired instances to the target; returns them."""
        if self._file is not None:
            await self._file.read()
        entries = self._entries()
        found = await asyncio.gather(*(self._expand(entry) for entry in entries))
        self._forget_unlisted(entries)
        desired = [instance for instances in found for instance in instances]
        self._target.reconcile(desired)
        return desired

    def _entries(self) -> list[ComfyInstanceSettings]:
        return [*self._static, *(self._file.entries if self._file is not None else [])]

    async def _expand(self, entry: ComfyInstanceSettings) -> list[ComfyInstanceSettings]:
        if not entry.discover:
            return [entry]
        host = urlsplit(entry.url).hostname or ""
        try:
            addresses = await self._resolver.addresses(host)
        except DiscoveryFailed as exc:
            return self._keep(entry, str(exc))
        self._failed.pop(entry, None)
        instances = expand(entry, addresses)
        if instances != self._found.get(entry):
            log.info("%s resolves to %d instance(s): %s", host, len(addresses), addresses)
        self._found[entry] = instances
        return instances

    def _keep(self, entry: ComfyInstanceSettings, error: str) -> list[ComfyInstanceSettings]:
        """The entry's last instances, after a failed look-up (logged once per new error)."""
        kept = self._found.get(entry, [])
        if self._failed.get(entry) != error:
            log.error("%s; keeping its %d instance(s)", error, len(kept))
        self._failed[entry] = error
        return kept

    def _forget_unlisted(self, entries: Sequence[ComfyInstanceSettings]) -> None:
        listed = set(entries)
        self._found = {e: found for e, found in self._found.items() if e in listed}
        self._failed = {e: error for e, error in self._failed.items() if e in listed}
