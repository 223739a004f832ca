"""OUTPUT_STORE and the object store's settings: validation, defaults, and the factory."""

from __future__ import annotations

import pytest

from consumer.object_store import S3OutputStore
from consumer.outputs import open_output_store, s3_config
from consumer.settings import OutputBackend, SettingsError, load_settings
from consumer.storage import LocalOutputStore

from .conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY

S3 = {"output_store": "s3", "output_s3_bucket": "pics"}


def test_local_is_the_default():
    """Without OUTPUT_STORE the local directory store is used, as before."""
    assert load_settings().output_store is OutputBackend.LOCAL


def test_s3_needs_a_bucket():
    """OUTPUT_STORE=s3 without OUTPUT_S3_BUCKET stops start-up, naming the variable."""
    with pytest.raises(SettingsError, match=r"OUTPUT_S3_BUCKET: .*OUTPUT_STORE=s3 needs a bucket"):
        load_settings(output_store="s3")


@pytest.mark.parametrize("expiry_s", [0, -5, 604_801, 10**9])
def test_url_expiry_is_bounded_by_sigv4(expiry_s):
    """A presigned URL lives 1 s to 7 days (SigV4's limit); anything else is refused."""
    with pytest.raises(SettingsError, match="OUTPUT_URL_EXPIRY_S"):
        load_settings(**S3, output_url_expiry_s=expiry_s)


def test_url_expiry_defaults_to_seven_days():
    """The default is the longest SigV4 allows."""
    assert load_settings(**S3).output_url_expiry_s == 604_800


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("output_s3_bucket", "no/slashes"),
        ("output_s3_bucket", "x"),
        ("output_s3_endpoint_url", "minio:9000"),
        ("output_s3_endpoint_url", "ftp://minio:9000"),
        ("output_s3_endpoint_url", "https://key:secret@minio:9000"),
        ("output_public_base_url", "https://cdn.example.com/x?sig=1"),
        ("output_s3_prefix", "../escape/"),
        ("output_s3_prefix", "a//b"),
        ("output_s3_prefix", "spaces here/"),
    ],
)
def test_bad_values_are_refused_by_name(name, value):
    """Malformed bucket names, endpoints, base URLs and prefixes name their variable."""
    with pytest.raises(SettingsError, match=name.upper()):
        load_settings(**{**S3, name: value})


@pytest.mark.parametrize(
    ("given", "normalised"),
    [("", ""), ("/", ""), ("outputs", "outputs/"), ("/a/b/", "a/b/"), ("a.b/c_d-1", "a.b/c_d-1/")],
)
def test_the_prefix_ends_with_a_slash(given, normalised):
    """A prefix is a folder: `outputs` stores under `outputs/<token>/...`."""
    assert load_settings(**S3, output_s3_prefix=given).output_s3_prefix == normalised


def test_base_urls_lose_their_trailing_slash():
    """Keys are appended after one `/`."""
    settings = load_settings(
        **S3,
        output_s3_endpoint_url="http://127.0.0.1:9000/",
        output_public_base_url="https://cdn.example.com/pics/",
    )
    assert settings.output_s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.output_public_base_url == "https://cdn.example.com/pics"


def test_aws_variables_are_read_from_the_environment(monkeypatch):
    """AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN/REGION come from the usual variables."""
    monkeypatch.setenv("OUTPUT_STORE", "s3")
    monkeypatch.setenv("OUTPUT_S3_BUCKET", "pics")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    settings = load_settings()
    config = s3_config(settings)
    assert (config.access_key_id, config.secret_access_key, config.session_token) == (
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        "session-token",
    )
    assert config.region == "eu-central-1"
    assert SECRET_ACCESS_KEY not in repr(settings)
    assert SECRET_ACCESS_KEY not in repr(config)


def test_output_s3_region_wins_over_aws_region_and_us_east_1_is_last():
    """OUTPUT_S3_REGION, else AWS_REGION, else us-east-1."""
    assert s3_config(load_settings(**S3)).region == "us-east-1"
    assert s3_config(load_settings(**S3, aws_region="eu-west-1")).region == "eu-west-1"
    both = load_settings(**S3, aws_region="eu-west-1", output_s3_region="auto")
    assert s3_config(both).region == "auto"


@pytest.mark.parametrize(
    "keys",
    [{"aws_access_key_id": ACCESS_KEY_ID}, {"aws_secret_access_key": SECRET_ACCESS_KEY}],
)
def test_half_a_key_pair_is_refused(keys):
    """An access key id without its secret (or the reverse) is a mistake, not a fallback."""
    with pytest.raises(SettingsError, match=r"AWS_SECRET_ACCESS_KEY: .*together"):
        load_settings(**S3, **keys)


def test_without_keys_the_client_chain_provides_credentials():
    """No AWS keys: nothing is passed, so obstore's role chain (IRSA, ECS, IMDS) applies."""
    config = s3_config(load_settings(**S3))
    assert (config.access_key_id, config.secret_access_key, config.session_token) == (
        None,
        None,
        None,
    )


def test_settings_reach_the_store_config():
    """Every object store setting lands in S3OutputConfig."""
    settings = load_settings(
        **S3,
        output_s3_endpoint_url="http://127.0.0.1:9000",
        output_s3_prefix="out",
        output_s3_force_path_style=True,
        output_s3_sweep=False,
        output_url_expiry_s=3600,
        output_public_base_url="https://cdn.example.com",
        output_upload_timeout_s=12,
    )
    config = s3_config(settings)
    assert (config.bucket, config.endpoint_url, config.prefix) == (
        "pics",
        "http://127.0.0.1:9000",
        "out/",
    )
    assert (config.force_path_style, config.sweep, config.url_expiry_s) == (True, False, 3600)
    assert (config.public_base_url, config.timeout_s) == ("https://cdn.example.com", 12)


async def test_the_factory_builds_the_configured_store(tmp_path):
    """local -> LocalOutputStore; s3 -> an S3OutputStore whose threads end with the block."""
    async with open_output_store(load_settings(output_dir=tmp_path)) as local:
        assert isinstance(local, LocalOutputStore)
    async with open_output_store(load_settings(**S3, max_concurrent_tasks=3)) as remote:
        assert isinstance(remote, S3OutputStore)
        assert remote._executor._max_workers == 4
    assert remote._store is None
