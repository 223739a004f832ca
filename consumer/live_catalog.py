"""The style catalog in use, replaced whole when WORKFLOWS_DIR changes or on SIGHUP.

Readers (intake, the dispatcher) call `get(style_type)`, answered from the catalog in use at
that moment. A Job keeps the Style it was admitted with, so a task in flight ends with the
version it started with whatever is reloaded meanwhile; a redelivered task is admitted again
and runs with the catalog in use then. A style removed by a reload refuses the requests that
ask for it from then on (`unsupported_style`), queued ones included.

One task (`watch`) performs every reload, so reloads never overlap; the SIGHUP handler only
calls `request_reload()`, which sets an Event. A reload reads and validates everything first
(`StyleCatalog.load`, in a worker thread); the swap is one assignment on the event loop, so a
reader never sees half a catalog. A broken edit keeps the catalog in use, logs the
WorkflowInvalid message (file, style, node) and holds `style_consumer_catalog_valid` at 0 until
an edit loads again.

Changes are found by content, not mtimes: `fingerprint` hashes styles.toml and every file
under templates/ every WORKFLOWS_RELOAD_INTERVAL_S (0: only on SIGHUP). The catalog is a few
kilobytes, and a content hash sees a same-size edit within the file system's mtime
granularity and a Kubernetes ConfigMap's symlink swap alike. Files seen broken are not
loaded again until they change (one error per broken edit, not one per poll).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from consumer.errors import WorkflowInvalid
from consumer.logs import ctx
from consumer.workflows import MANIFEST_NAME, TEMPLATES_DIR_NAME, StyleCatalog

if TYPE_CHECKING:
    from pathlib import Path

    from consumer.metrics import Metrics
    from consumer.workflows import Style

log = logging.getLogger(__name__)


class LiveCatalog:
    """Holds the catalog in use (`current`) and reloads it; a StyleLookup for its readers.

    Loading at construction raises WorkflowInvalid: a service does not start without styles.
    """

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self._directory = directory
        self._metrics = metrics
        self._seen = fingerprint(directory)  # taken first: an edit while loading is seen next
        self._current = StyleCatalog.load(directory)
        self.error: str | None = None  # why the files on disk are refused, while they are
        self._requested = asyncio.Event()
        self._attempted = asyncio.Event()
        self._reloading = asyncio.Lock()  # one reload at a time: the last read is the one in use
        self._publish(self._current)

    def __repr__(self) -> str:
        state = "valid" if self.error is None else "invalid on disk"
        return f"<LiveCatalog styles={len(self._current)} {state}>"

    @property
    def current(self) -> StyleCatalog:
        return self._current

    def get(self, style_type: str) -> Style:
        return self._current.get(style_type)

    @property
    def attempted(self) -> asyncio.Event:
        """Set when the next reload that reads the files ends, loaded or refused (take it
        before causing the reload)."""
        return self._attempted

    def request_reload(self) -> None:
        """Reload at once, changed or not (the SIGHUP handler; safe in a signal handler)."""
        self._requested.set()

    async def watch(self, interval_s: float) -> None:
        """Reload on request, and when the files change (polled every `interval_s`; 0: never)."""
        while True:
            forced = await self._next_turn(interval_s)
            await self.reload(force=forced)

    async def _next_turn(self, interval_s: float) -> bool:
        """Wait for a request (True) or the next poll (False)."""
        try:
            async with asyncio.timeout(interval_s or None):
                await self._requested.wait()
        except TimeoutError:
            return False
        self._requested.clear()
        return True

    async def reload(self, *, force: bool = True) -> bool:
        """Load the files when forced or changed; True when a new catalog is in use."""
        async with self._reloading:
            seen = await asyncio.to_thread(fingerprint, self._directory)
            if not force and seen == self._seen:
                return False
            self._seen = seen
            return await self._load()

    async def _load(self) -> bool:
        try:
            catalog = await asyncio.to_thread(StyleCatalog.load, self._directory)
        except WorkflowInvalid as exc:
            log.error("style catalog refused, the one in use stays: %s", exc)  # noqa: TRY400 - it names file and field
            self._refused(exc)
            return False
        except Exception as exc:  # a bug: the service goes on with the catalog in use
            log.exception("style catalog reload crashed, the one in use stays")
            self._refused(exc)
            return False
        else:
            self._swap(catalog)
            return True
        finally:
            self._attempted.set()
            self._attempted = asyncio.Event()

    def describe(self) -> dict[str, object]:
        """For /health: the versions in use, and whether the files on disk load (the reason
        is logged, not shown on an open endpoint)."""
        return {"styles": self._current.versions(), "valid": self.error is None}

    def _swap(self, catalog: StyleCatalog) -> None:
        old, self._current = self._current.versions(), catalog
        self.error = None
        self._publish(catalog)
        versions = catalog.versions()
        log.info("style catalog reloaded", extra=ctx(**_changes(old, versions), versions=versions))

    def _refused(self, exc: Exception) -> None:
        self.error = str(exc)
        self._metrics.catalog_valid.set(0)
        self._metrics.catalog_reload_errors.inc()

    def _publish(self, catalog: StyleCatalog) -> None:
        metrics = self._metrics
        metrics.style_info.clear()
        for name, version in catalog.versions().items():
            metrics.style_info.labels(name, version).set(1)
        metrics.catalog_valid.set(1)
        metrics.catalog_loaded_timestamp_seconds.set(time.time())


def _changes(old: dict[str, str], new: dict[str, str]) -> dict[str, list[str]]:
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(n for n in new.keys() & old.keys() if new[n] != old[n]),
    }


def fingerprint(directory: Path) -> str:
    """A digest of what `StyleCatalog.load` reads: styles.toml and the files in templates/.

    Never raises: a missing or unreadable file is part of the digest (and load reports it).
    """
    digest = hashlib.sha256()
    for path in [directory / MANIFEST_NAME, *_files(directory / TEMPLATES_DIR_NAME)]:
        data = _read(path)
        digest.update(f"{path.relative_to(directory)}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    try:
        return sorted(path for path in directory.iterdir() if path.is_file())
    except OSError:
        return []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}".encode()
