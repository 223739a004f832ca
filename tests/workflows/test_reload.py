"""The live catalog: reloads on request, on file changes and on SIGHUP; refuses broken edits."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from consumer.__main__ import signal_handlers
from consumer.errors import UnsupportedStyle
from consumer.live_catalog import LiveCatalog, fingerprint
from consumer.metrics import Metrics
from consumer.settings import SettingsError, load_settings
from consumer.workflows import RenderParams
from tests.workflows.graphs import WORKFLOWS_DIR, edit_manifest, replace_file, until_reloaded

WAIT_S = 10.0
CLAY_PROMPT = 'prompt = "Clay Style, lovely, 3d, cute"'
EDITED_PROMPT = 'prompt = "Clay Style, glossy"'
PARAMS = RenderParams(image="in.png", seed=1, filename_prefix="out")


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    """A copy of the shipped workflows directory, to edit."""
    return Path(shutil.copytree(WORKFLOWS_DIR, tmp_path / "workflows"))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def live(workflows: Path, metrics: Metrics) -> LiveCatalog:
    return LiveCatalog(workflows, metrics)


async def until(live: LiveCatalog, check: Callable[[], bool]) -> None:
    await until_reloaded(live, check, WAIT_S)


@asynccontextmanager
async def watching(live: LiveCatalog, interval_s: float) -> AsyncIterator[None]:
    """`live.watch(interval_s)` runs for the block, in a task group of the test."""
    async with asyncio.TaskGroup() as group:
        task = group.create_task(live.watch(interval_s))
        try:
            yield
        finally:
            task.cancel()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"style_consumer_{name}", labels)


async def test_reload_swaps_in_the_edited_style(
    live: LiveCatalog, workflows: Path, metrics: Metrics
) -> None:
    """An edited prompt gives clay a new version; other styles keep theirs; held ones stay."""
    held, before = live.get("clay"), live.current.versions()
    loaded_at = sample(metrics, "catalog_loaded_timestamp_seconds")
    edit_manifest(workflows, CLAY_PROMPT, EDITED_PROMPT)
    assert await live.reload()
    clay = live.get("clay")
    assert clay.prompt == "Clay Style, glossy"
    assert clay.version != held.version
    assert {n: v for n, v in live.current.versions().items() if n != "clay"} == {
        n: v for n, v in before.items() if n != "clay"
    }
    assert held.prompt == "Clay Style, lovely, 3d, cute"  # a task holding it runs it unchanged
    assert sample(metrics, "style_info", style="clay", version=clay.version) == 1
    assert sample(metrics, "style_info", style="clay", version=held.version) is None
    assert sample(metrics, "catalog_valid") == 1
    assert (sample(metrics, "catalog_loaded_timestamp_seconds") or 0) >= (loaded_at or 0) > 0


@pytest.mark.parametrize(
    ("path", "old", "new", "culprit"),
    [
        ("styles.toml", 'cute"\nstrength = 0.6', 'cute"\nstrength = 2', r"toml.*clay.*strength"),
        ("styles.toml", "[styles.clay]", "[styles.clay", r"styles\.toml: not a readable TOML"),
        ("templates/img2img_sd15.json", '"KSampler"', '"KSampler",', r"img2img_sd15\.json"),
    ],
    ids=["bad-value", "bad-toml", "bad-template"],
)
async def test_broken_edit_keeps_the_catalog_in_use(
    live: LiveCatalog,
    workflows: Path,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
    path: str,
    old: str,
    new: str,
    culprit: str,
) -> None:
    """A broken edit is refused: the old styles serve, the log and metrics say what is wrong."""
    held = live.get("clay")
    target = workflows / path
    text = target.read_text(encoding="utf-8")
    assert old in text
    replace_file(target, text.replace(old, new, 1))
    with caplog.at_level(logging.ERROR, logger="consumer.live_catalog"):
        assert not await live.reload()
    assert live.get("clay") is held
    assert live.error is not None
    assert caplog.records
    assert sample(metrics, "catalog_valid") == 0
    assert sample(metrics, "catalog_reload_errors_total") == 1
    assert sample(metrics, "style_info", style="clay", version=held.version) == 1
    assert re.search(culprit, live.error), live.error
    replace_file(target, text)
    assert await live.reload()
    assert live.error is None
    assert sample(metrics, "catalog_valid") == 1


async def test_unchanged_files_are_not_read_again(live: LiveCatalog, metrics: Metrics) -> None:
    """A poll that finds the same content does nothing: no reload, no new load time."""
    loaded_at = sample(metrics, "catalog_loaded_timestamp_seconds")
    attempted = live.attempted
    assert not await live.reload(force=False)
    assert not attempted.is_set()
    assert sample(metrics, "catalog_loaded_timestamp_seconds") == loaded_at


async def test_a_broken_edit_is_reported_once_until_it_changes(
    live: LiveCatalog, workflows: Path, metrics: Metrics
) -> None:
    """Polls of the same broken files count one error; the next edit is read again."""
    edit_manifest(workflows, "strength = 0.6\n", "strength = 2\n")
    assert not await live.reload(force=False)
    assert not await live.reload(force=False)
    assert sample(metrics, "catalog_reload_errors_total") == 1
    edit_manifest(workflows, "strength = 2\n", "strength = 0.65\n")
    assert await live.reload(force=False)
    assert live.get("clay").strength == pytest.approx(0.65)


async def test_removed_style_is_refused_after_reload(live: LiveCatalog, workflows: Path) -> None:
    """A style taken out of the manifest is unsupported from then on; a held one still renders."""
    held = live.get("anime")
    anime = '[styles.anime]\nprompt = "Anime Style, beautiful, detailed"\nstrength = 0.7\n'
    edit_manifest(workflows, anime, "")
    assert await live.reload()
    with pytest.raises(UnsupportedStyle, match="'anime'"):
        live.get("anime")
    assert held.render(PARAMS)


async def test_watch_reloads_when_a_template_changes(live: LiveCatalog, workflows: Path) -> None:
    """Polling sees an edited template (not the manifest) and every style using it changes."""
    before = live.current.versions()
    template = workflows / "templates" / "img2img_sd15.json"
    async with watching(live, interval_s=0.01):
        text = template.read_text(encoding="utf-8")
        replace_file(template, text.replace('"vae": ["2", 2]', '"vae": ["2", 2], "tile": 1', 1))
        await until(live, lambda: live.current.versions() != before)
    assert all(live.current.versions()[name] != version for name, version in before.items())


async def test_sighup_reloads_through_the_installed_handler(
    live: LiveCatalog, workflows: Path
) -> None:
    """With polling off, the real SIGHUP (handled as `python -m consumer` does) reloads."""
    stop = asyncio.Event()
    old = live.get("clay").version
    edit_manifest(workflows, CLAY_PROMPT, EDITED_PROMPT)
    async with watching(live, interval_s=0):
        with signal_handlers(stop, live.request_reload):
            os.kill(os.getpid(), signal.SIGHUP)
            await until(live, lambda: live.get("clay").version != old)
    assert live.get("clay").prompt == "Clay Style, glossy"
    assert not stop.is_set()


def test_fingerprint_follows_content(workflows: Path) -> None:
    """Same bytes, same fingerprint; a same-size edit or a new template file changes it."""
    first = fingerprint(workflows)
    assert fingerprint(workflows) == first
    edit_manifest(workflows, "strength = 0.6\n", "strength = 0.5\n")
    second = fingerprint(workflows)
    assert second != first
    (workflows / "templates" / "new.json").write_text("{}", encoding="utf-8")
    assert fingerprint(workflows) != second
    assert fingerprint(workflows / "missing")  # never raises


def test_reload_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKFLOWS_RELOAD_INTERVAL_S: 5 s by default, 0 turns polling off, negative is refused."""
    assert load_settings().workflows_reload_interval_s == 5.0
    monkeypatch.setenv("WORKFLOWS_RELOAD_INTERVAL_S", "0")
    assert load_settings().workflows_reload_interval_s == 0
    monkeypatch.setenv("WORKFLOWS_RELOAD_INTERVAL_S", "-1")
    with pytest.raises(SettingsError, match="WORKFLOWS_RELOAD_INTERVAL_S"):
        load_settings()
