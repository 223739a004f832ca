"""Every setting of the service, read once from the environment (and `.env`) in `__main__`.

Names follow the original HTTP design where they carry over (`DEBUG`, `LOG_LEVEL`,
`COMFYUI_BASE_URL`, `MAX_CONCURRENT_TASKS`, `TASK_CLEANUP_HOURS`). Durations end in `_s`
or `_ms`, sizes in `_bytes`. Nothing below the entrypoint reads `os.environ`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SIDECAR_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: any client can send it
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit on a presigned URL's lifetime
S3_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
S3_PREFIX_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
TRACES_EXPORTERS = frozenset({"otlp", "console", "none"})  # OTEL_TRACES_EXPORTER values


class StateBackend(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class OutputBackend(StrEnum):
    LOCAL = "local"  # OUTPUT_DIR, served by the sidecar's /outputs
    S3 = "s3"  # any S3-compatible object store (consumer/object_store.py)


class SchedulerPolicy(StrEnum):
    FAIR = "fair"  # model affinity, interactive before bulk, bulk shared fairly by user
    FIFO = "fifo"  # arrival order, least-loaded instance: the baseline, for comparison


class ComfyInstanceSettings(BaseModel):
    """One ComfyUI server of the pool; with `discover`, one per address of the URL's host
    name (its A/AAAA records, e.g. a Kubernetes headless Service: consumer/comfy/membership.py).
    """

    model_config = {"extra": "forbid", "frozen": True}

    url: str
    name: str = ""
    max_concurrency: int = Field(default=2, ge=1, le=64)
    discover: bool = False

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        _check_http_url(value)
        return value.rstrip("/")

    @property
    def label(self) -> str:
        """A short, stable name for logs and metric labels (never the URL's credentials)."""
        parts = urlsplit(self.url)
        return self.name or (
            f"{parts.hostname}:{parts.port}" if parts.port else f"{parts.hostname}"
        )


def _check_http_url(value: str) -> SplitResult:
    """`value` split, when it is an http(s) URL with a host; else ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return parts


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


def _split_list(value: object) -> object:
    """Accept a JSON list or a comma-separated string for list settings."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """The one settings object. Built in `__main__`, passed down explicitly."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # General
    debug: bool = False
    log_level: str = "INFO"

    # Broker
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    amqp_prefix: str = Field(default="style", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    amqp_heartbeat_s: int = Field(default=15, ge=10, le=20)
    amqp_publish_timeout_s: float = Field(default=10.0, gt=0)
    amqp_delivery_limit: int = Field(default=5, ge=1)
    max_message_bytes: int = Field(default=1 * MIB, ge=1024)
    reply_to_pattern: str | None = None  # queues a reply_to may name besides Direct Reply-to

    # ComfyUI pool
    comfyui_base_url: str | None = None
    comfyui_instances: Annotated[list[ComfyInstanceSettings], NoDecode] = Field(
        default_factory=list
    )
    comfyui_max_concurrency: int = Field(default=2, ge=1, le=64)
    comfyui_connect_timeout_s: float = Field(default=5.0, gt=0)
    comfyui_request_timeout_s: float = Field(default=30.0, gt=0)
    comfyui_health_interval_s: float = Field(default=5.0, gt=0)
    comfyui_breaker_max_backoff_s: float = Field(default=60.0, gt=0)
    comfyui_ws_reconnect_max_s: float = Field(default=10.0, gt=0)
    comfyui_history_wait_s: float = Field(default=10.0, gt=0)
    comfyui_outage_grace_s: float = Field(default=30.0, gt=0)
    comfyui_ws_heartbeat_s: float = Field(default=15.0, gt=0)
    max_concurrent_tasks: int = Field(default=10, ge=1)

    # ComfyUI membership: DNS discovery and an instance file, re-read (consumer/comfy/membership.py)
    comfyui_instances_file: Path | None = None  # a JSON or YAML list, as COMFYUI_INSTANCES
    comfyui_discovery_interval_s: float = Field(default=10.0, gt=0)  # re-resolve, re-read
    comfyui_drain_grace_s: float = Field(default=30.0, ge=0)  # then a removed one's prompts move
    comfyui_dns_nameservers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    comfyui_dns_timeout_s: float = Field(default=5.0, gt=0)  # per look-up, all tries together

    # Scheduling
    scheduler: SchedulerPolicy = SchedulerPolicy.FAIR
    scheduler_window: int = Field(default=2, ge=0, le=64)  # bulk tasks held beyond free slots
    scheduler_batch_slice: int = Field(default=4, ge=1, le=50)  # batch tasks fed per turn
    scheduler_bulk_poll_s: float = Field(default=1.0, gt=0, le=60)
    model_load_estimate_s: float = Field(default=10.0, ge=0)  # until a load was observed

    # Tasks
    task_timeout_s: float = Field(default=600.0, gt=0)
    execution_timeout_s: float = Field(default=300.0, gt=0)
    lease_ttl_s: float = Field(default=30.0, gt=0)
    task_cleanup_hours: float = Field(default=24.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=30.0, ge=0)
    progress_interval_ms: int = Field(default=500, ge=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    # Input images
    image_max_bytes: int = Field(default=20 * MIB, ge=1024)
    image_max_pixels: int = Field(default=50_000_000, ge=1)
    image_max_pixels_full_decode: int = Field(default=30_000_000, ge=1)
    image_decode_budget_bytes: int = Field(default=576 * MIB, ge=64 * MIB)
    image_max_side: int = Field(default=1024, ge=64)
    image_png_compress_level: int = Field(default=0, ge=0, le=9)
    image_connect_timeout_s: float = Field(default=5.0, gt=0)
    image_total_timeout_s: float = Field(default=30.0, gt=0)
    image_max_redirects: int = Field(default=3, ge=0)
    image_url_allow_private: bool = False
    image_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Workflows and outputs
    workflows_dir: Path = REPO_ROOT / "workflows"
    workflows_reload_interval_s: float = Field(default=5.0, ge=0)  # poll for edits; 0: SIGHUP only
    output_dir: Path = Path("data/outputs")
    public_base_url: str = "http://localhost:8080"
    output_upload_timeout_s: float = Field(default=60.0, gt=0)

    # Outputs in an object store (OUTPUT_STORE=s3: AWS, MinIO, R2, OSS, Ceph). Credentials are
    # the AWS_* variables when set, else the client's role chain (web identity, ECS, IMDS).
    output_store: OutputBackend = OutputBackend.LOCAL
    output_s3_bucket: str | None = Field(default=None, validate_default=True)
    output_s3_endpoint_url: str | None = None  # unset: AWS, from the region
    output_s3_region: str | None = None  # else AWS_REGION, else us-east-1
    output_s3_prefix: str = ""  # keys are <prefix><token>/<filename>
    output_s3_force_path_style: bool = False  # true for MinIO and most Ceph gateways
    output_s3_sweep: bool = True  # delete objects older than TASK_CLEANUP_HOURS
    output_url_expiry_s: int = Field(default=MAX_PRESIGN_S, ge=1, le=MAX_PRESIGN_S)
    output_public_base_url: str | None = None  # public bucket or CDN: unsigned URLs
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = Field(default=None, validate_default=True)
    aws_session_token: SecretStr | None = None
    aws_region: str | None = None

    # Task state
    state_backend: StateBackend = StateBackend.MEMORY
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_key_prefix: str = "style-consumer:"

    # Sidecar
    sidecar_host: str = "127.0.0.1"  # anything else needs SIDECAR_TOKEN (see _sidecar_token)
    sidecar_port: int = Field(default=8080, ge=0, le=65535)
    sidecar_token: SecretStr | None = Field(default=None, validate_default=True)

    # Tracing (consumer/tracing.py): OpenTelemetry's standard variables that decide whether and
    # where spans go. The SDK reads the rest of the OTEL_* standard itself (headers, timeout,
    # TLS files, compression, sampler, resource attributes, batch limits), and only when
    # tracing is on: re-declaring that standard here would copy its parsing, and drift.
    otel_sdk_disabled: bool = False
    otel_traces_exporter: Annotated[list[str], NoDecode] = Field(default_factory=list)
    otel_exporter_otlp_endpoint: str | None = None  # a base URL: /v1/traces is appended
    otel_exporter_otlp_traces_endpoint: str | None = None  # the full URL, used as it is
    otel_exporter_otlp_protocol: str | None = None
    otel_exporter_otlp_traces_protocol: str | None = None
    otel_service_name: str = Field(default="style-consumer", min_length=1)

    @field_validator("otel_traces_exporter", mode="before")
    @classmethod
    def _parse_exporters(cls, value: Any) -> Any:
        items = _split_list(value)
        return [str(i).strip().lower() for i in items] if isinstance(items, list) else items

    @field_validator("otel_traces_exporter")
    @classmethod
    def _known_exporters(cls, value: list[str]) -> list[str]:
        unknown = set(value) - TRACES_EXPORTERS
        if unknown:
            raise ValueError(f"{sorted(unknown)} not supported: use otlp, console or none")
        return value

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, value: str | None) -> str | None:
        if value:
            _check_http_url(value)
        return value or None

    @model_validator(mode="after")
    def _otlp_exportable(self) -> Settings:
        """OTLP is exported over HTTP/protobuf, by the `tracing` extra (the image has it)."""
        if "otlp" not in self.traces_exporters():
            return self
        protocol = self.otel_exporter_otlp_traces_protocol or self.otel_exporter_otlp_protocol
        if protocol not in {None, "", "http/protobuf"}:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only http/protobuf")
        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
            raise ValueError("OTLP tracing needs: pip install 'style-consumer[tracing]'")
        return self

    def traces_exporters(self) -> frozenset[str]:
        """Where spans go: OTEL_TRACES_EXPORTER, else OTLP once an OTLP endpoint is set."""
        if self.otel_sdk_disabled:
            return frozenset()
        if self.otel_traces_exporter:
            return frozenset(self.otel_traces_exporter) - {"none"}
        endpoint = self.otel_exporter_otlp_traces_endpoint or self.otel_exporter_otlp_endpoint
        return frozenset({"otlp"}) if endpoint else frozenset()

    def otlp_traces_url(self) -> str:
        """The OTLP/HTTP traces URL, as the specification derives it."""
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        base = self.otel_exporter_otlp_endpoint or "http://localhost:4318"
        return f"{base.rstrip('/')}/v1/traces"

    @field_validator("comfyui_instances", mode="before")
    @classmethod
    def _parse_instances(cls, value: Any) -> Any:
        items = _split_list(value)
        if not isinstance(items, list):
            return items
        return [{"url": item} if isinstance(item, str) else item for item in items]

    @field_validator("comfyui_dns_nameservers", mode="before")
    @classmethod
    def _parse_nameservers(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("comfyui_dns_nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        """`ip` or `ip:port` (`[v6]:port`); empty: the system's resolver configuration."""
        for item in value:
            nameserver_address(item)
        return value

    @field_validator("image_url_allowed_hosts", mode="before")
    @classmethod
    def _parse_hosts(cls, value: Any) -> Any:
        items = _split_list(value)
        return [str(h).lower() for h in items] if isinstance(items, list) else items

    @field_validator("reply_to_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value or None

    @field_validator("sidecar_token")
    @classmethod
    def _sidecar_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """An empty token is no token, which only a loopback SIDECAR_HOST may go without."""
        token = value.get_secret_value() if value is not None else ""
        if token and not SIDECAR_TOKEN_CHARS.fullmatch(token):
            raise ValueError("use visible ASCII characters only, no spaces")
        host = info.data.get("sidecar_host")
        if not token and isinstance(host, str) and not is_loopback(host):
            raise ValueError(
                f"SIDECAR_HOST={host!r} is not a loopback address, so other machines could "
                "reach the task endpoints: set SIDECAR_TOKEN to a long random secret "
                "(e.g. `openssl rand -hex 32`), or bind SIDECAR_HOST=127.0.0.1"
            )
        return value if token else None

    @field_validator("output_s3_bucket")
    @classmethod
    def _s3_bucket(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and not S3_BUCKET_NAME.fullmatch(value):
            raise ValueError(f"not a bucket name: {value!r}")
        if not value and info.data.get("output_store") == OutputBackend.S3:
            raise ValueError("OUTPUT_STORE=s3 needs a bucket: set OUTPUT_S3_BUCKET")
        return value or None

    @field_validator("output_s3_endpoint_url", "output_public_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host and no query: a base that keys are appended to."""
        if not value:
            return None
        parts = _check_http_url(value)
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("give a plain base URL, without query, fragment or credentials")
        return value.rstrip("/")

    @field_validator("output_s3_prefix")
    @classmethod
    def _s3_prefix(cls, value: str) -> str:
        """Empty, or `/`-separated parts of `[A-Za-z0-9._-]` (no leading dot) ending in `/`."""
        parts = value.strip("/").split("/") if value.strip("/") else []
        if not all(S3_PREFIX_PART.fullmatch(part) for part in parts):
            raise ValueError(f"use parts of [A-Za-z0-9._-] not starting with a dot: {value!r}")
        return "".join(f"{part}/" for part in parts)

    @field_validator("aws_secret_access_key")
    @classmethod
    def _aws_key_pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        secret = value.get_secret_value() if value is not None else ""
        key_id = info.data.get("aws_access_key_id")
        if bool(secret) != bool(key_id and key_id.get_secret_value()):
            raise ValueError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY together")
        return value if secret else None

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    def instances(self) -> list[ComfyInstanceSettings]:
        """The pool: `COMFYUI_INSTANCES` (none when only COMFYUI_INSTANCES_FILE lists them),
        else `COMFYUI_BASE_URL`, else the seed's default."""
        if self.comfyui_instances or self.comfyui_instances_file:
            return [
                inst
                if "max_concurrency" in inst.model_fields_set
                else inst.model_copy(update={"max_concurrency": self.comfyui_max_concurrency})
                for inst in self.comfyui_instances
            ]
        url = self.comfyui_base_url or "http://127.0.0.1:8188"
        return [ComfyInstanceSettings(url=url, max_concurrency=self.comfyui_max_concurrency)]


def nameserver_address(text: str) -> tuple[str, int]:
    """`ip`, `ip:port` or `[v6]:port` as (ip, port); port 53 when not given."""
    try:
        return str(ipaddress.ip_address(text)), 53
    except ValueError:
        pass
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port or 53
        return str(ipaddress.ip_address(parts.hostname or "")), port
    except ValueError as exc:
        raise ValueError(f"not an IP address with an optional port: {text!r}") from exc


class SettingsError(Exception):
    """Start-up refused: a setting has a bad value. The message names the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's error into one naming the environment variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']).upper() or '?'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from exc
