"""The summary tables printed at the end of a test run (fault suite, hostile-input suite)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def write_table(
    terminalreporter: Any,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer: str,
) -> None:
    """A section `title` with `rows` under `header` in aligned columns, then `footer`."""
    cells = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    terminalreporter.section(title)
    for row in cells:
        terminalreporter.write_line(
            " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        )
    terminalreporter.write_line(footer)
