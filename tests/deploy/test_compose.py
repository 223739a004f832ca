"""deploy/docker-compose.yml, the single-machine deployment: valid Compose, every file it
mounts is in the repo, and the consumer's environment is real settings pointing at real
services. (No Docker engine here: this is as far as the file is checked.)"""

from __future__ import annotations

import copy
import json
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from consumer.settings import REPO_ROOT, Settings

COMPOSE_FILE = REPO_ROOT / "deploy" / "docker-compose.yml"
COMPOSE_SCHEMA = REPO_ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"
PROMETHEUS_FILE = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a mapping that names a key twice (YAML would keep the last one silently)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key) for key, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {duplicates}", node.start_mark
        )
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.load(COMPOSE_FILE.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8")))


def interpolate(value: str) -> str:
    """`value` as Compose would make it with no variable set, errors answered with a dummy."""

    def one(match: re.Match[str]) -> str:
        if match["op"] in {":-", "-"}:
            return match["arg"]
        return f"test-{match['name'].lower()}-" + "x" * 32

    return INTERPOLATION.sub(one, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment (map or KEY=VALUE list), interpolated."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: interpolate(str(value)) for name, value in env.items()}


def duration_s(text: str) -> float:
    """A Compose duration (`1m30s`, `40s`) in seconds."""
    assert DURATION_PART.sub("", text) == "", f"not a duration: {text!r}"
    return sum(float(n) * DURATION_UNIT_S[unit] for n, unit in DURATION_PART.findall(text))


def test_file_matches_the_compose_specification(compose, validator):
    """The file is valid against the Compose specification's JSON Schema, keys unique."""
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "value"),
    [(("services", "consumer", "enviroment"), {}), (("services", "redis", "ports"), "6379")],
    ids=["misspelt-key", "ports-not-a-list"],
)
def test_schema_rejects_a_broken_file(compose, validator, path, value):
    """The schema check is live: one wrong key or type fails it."""
    broken = copy.deepcopy(compose)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    assert validator.is_valid(compose)
    assert not validator.is_valid(broken)


def test_duplicate_keys_are_refused():
    """Two edits adding the same top-level key would otherwise silently drop one."""
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate"):
        yaml.load("volumes: {}\nvolumes: {}\n", Loader=_UniqueKeyLoader)  # noqa: S506


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/", "~")):
            sources.append(source)
    return sources


def test_every_mounted_file_is_in_the_repo(compose):
    """Bind mounts, build contexts and config/secret files all exist under deploy/."""
    base = COMPOSE_FILE.parent
    paths = [base / s for svc in compose["services"].values() for s in _bind_sources(svc)]
    paths += [
        base / f["file"]
        for k in ("configs", "secrets")
        for f in compose.get(k, {}).values()
        if "file" in f
    ]
    assert [p for p in paths if not p.resolve().is_relative_to(REPO_ROOT)] == []
    assert [str(p) for p in paths if not p.exists()] == []
    for service in compose["services"].values():
        if "build" in service:
            build = service["build"]
            context = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (context / dockerfile).is_file()


def test_consumer_environment_is_real_settings(compose):
    """Every consumer variable is a Settings field, and together they make valid Settings."""
    env = environment(compose["services"]["consumer"])
    assert set(env) <= {name.upper() for name in Settings.model_fields}
    settings = Settings(**{name.lower(): value for name, value in env.items()})
    assert settings.state_backend == "redis"


def test_consumer_talks_to_services_of_this_file(compose):
    """Broker, Redis and ComfyUI URLs name services of this file, started before it."""
    services = compose["services"]
    env = environment(services["consumer"])
    settings = Settings(**{name.lower(): value for name, value in env.items()})
    urls = [settings.amqp_url.get_secret_value(), settings.redis_url.get_secret_value()]
    urls += [instance.url for instance in settings.instances()]
    assert {urlsplit(url).hostname for url in urls} <= set(services)
    assert {"rabbitmq", "redis"} <= set(services["consumer"]["depends_on"])


def test_consumer_gets_its_shutdown_grace(compose):
    """Docker waits longer than SHUTDOWN_GRACE_S before it kills the consumer."""
    consumer = compose["services"]["consumer"]
    env = environment(consumer)
    grace_s = float(env.get("SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    assert duration_s(consumer["stop_grace_period"]) > grace_s


def test_prometheus_scrapes_services_of_this_file(compose):
    """Every static scrape target is a service of this file."""
    config = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert targets
    assert {target.rpartition(":")[0] for target in targets} <= set(compose["services"])


def test_duration_parser_reads_compose_durations():
    """The helper above reads the forms Compose accepts."""
    assert duration_s("40s") == 40
    assert duration_s("1m30s") == 90
    assert duration_s("1500ms") == 1.5
    with pytest.raises(AssertionError):
        duration_s("40")


def test_interpolation_helper():
    """Defaults are used, required variables get a dummy, plain text is kept."""
    assert interpolate("a${X:-b}c") == "abc"
    assert interpolate("${TOKEN:?set it}").startswith("test-token-")
    assert interpolate("plain") == "plain"
