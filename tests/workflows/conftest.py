"""A fixture that writes workflows directories into tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.workflows.graphs import MINIMAL_MANIFEST, real_template

WriteDir = Callable[..., Path]


@pytest.fixture
def write_dir(tmp_path: Path) -> WriteDir:
    """Write a workflows dir: a manifest and templates (dicts as JSON, str verbatim)."""

    def write(manifest: str = MINIMAL_MANIFEST, templates: dict[str, Any] | None = None) -> Path:
        directory = tmp_path / "workflows"
        (directory / "templates").mkdir(parents=True)
        (directory / "styles.toml").write_text(manifest, encoding="utf-8")
        for name, body in (
            templates if templates is not None else {"t.json": real_template()}
        ).items():
            text = body if isinstance(body, str) else json.dumps(body)
            (directory / "templates" / name).write_text(text, encoding="utf-8")
        return directory

    return write
