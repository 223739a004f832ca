"""Write the JSON Schema files of the contract: `python -m contracts.generate [--check]`.

The files are JSON Schema draft-07 (what AsyncAPI 3.0 tools read), deterministic: sorted
keys, two-space indent, a trailing newline. `--check` writes nothing and exits 1 when a
committed file differs from what the models generate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema

from contracts.models import (
    BatchCompletedEvent,
    BatchTransformRequest,
    CancelRequest,
    TaskEvent,
    TransformRequest,
)

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
DRAFT_07 = "http://json-schema.org/draft-07/schema#"
_REF_TEMPLATE = "#/definitions/{model}"

# Requests are described as the service accepts them; events as the service writes them
# (every field present).
SCHEMAS: Mapping[str, tuple[type[BaseModel], JsonSchemaMode]] = MappingProxyType(
    {
        "transform_request": (TransformRequest, "validation"),
        "batch_transform_request": (BatchTransformRequest, "validation"),
        "cancel_request": (CancelRequest, "validation"),
        "task_event": (TaskEvent, "serialization"),
        "batch_completed_event": (BatchCompletedEvent, "serialization"),
    }
)


class _ContractSchema(GenerateJsonSchema):
    """Pydantic's generator without per-field titles (the property names say it)."""

    def field_title_should_be_set(self, schema: CoreSchema) -> Literal[False]:  # noqa: ARG002 - hook signature
        return False


def build_schema(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
    """The draft-07 JSON Schema document of one model."""
    schema = model.model_json_schema(
        mode=mode, ref_template=_REF_TEMPLATE, schema_generator=_ContractSchema
    )
    definitions = schema.pop("$defs", None)
    if definitions:
        schema["definitions"] = definitions
    return {
        "$schema": DRAFT_07,
        "$comment": "Generated from contracts/models.py by `python -m contracts.generate`. "
        "Do not edit.",
        **schema,
    }


def render(schema: Mapping[str, Any]) -> str:
    """The canonical text of a schema file."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """File name -> text, for every schema of the contract."""
    return {
        f"{name}.json": render(build_schema(model, mode)) for name, (model, mode) in SCHEMAS.items()
    }


def stale_files(directory: Path) -> list[str]:
    """Names of the files under `directory` that are missing or differ from the models."""
    return [
        name
        for name, text in render_all().items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    ]


def write_all(directory: Path) -> list[str]:
    """Write every schema file that changed; return their names."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = stale_files(directory)
    texts = render_all()
    for name in changed:
        (directory / name).write_text(texts[name], "utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when a file is stale")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        for name in stale:
            sys.stderr.write(f"stale: {args.dir / name} (run `make schemas`)\n")
        return 1 if stale else 0
    for name in write_all(args.dir):
        sys.stdout.write(f"wrote {args.dir / name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
