"""Builds the output store OUTPUT_STORE names: the local directory, or an S3 bucket."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from consumer.object_store import DEFAULT_REGION, S3OutputConfig, S3OutputStore
from consumer.settings import OutputBackend
from consumer.storage import LocalOutputStore, OutputStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pydantic import SecretStr

    from consumer.settings import Settings


@asynccontextmanager
async def open_output_store(settings: Settings) -> AsyncIterator[OutputStore]:
    """The configured store, open for the life of the block."""
    if settings.output_store is OutputBackend.LOCAL:
        yield LocalOutputStore(settings.output_dir, settings.public_base_url)
        return
    # Uploads block a thread each; one per task that may be in flight, plus the sweep.
    workers = settings.max_concurrent_tasks + 1
    async with S3OutputStore(s3_config(settings), max_workers=workers) as store:
        yield store


def s3_config(settings: Settings) -> S3OutputConfig:
    """The object store's part of Settings (the bucket was checked to be set)."""
    s = settings
    return S3OutputConfig(
        bucket=s.output_s3_bucket or "",
        region=s.output_s3_region or s.aws_region or DEFAULT_REGION,
        endpoint_url=s.output_s3_endpoint_url,
        prefix=s.output_s3_prefix,
        force_path_style=s.output_s3_force_path_style,
        url_expiry_s=s.output_url_expiry_s,
        public_base_url=s.output_public_base_url,
        timeout_s=s.output_upload_timeout_s,
        sweep=s.output_s3_sweep,
        access_key_id=_reveal(s.aws_access_key_id),
        secret_access_key=_reveal(s.aws_secret_access_key),
        session_token=_reveal(s.aws_session_token),
    )


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() or None if secret is not None else None
