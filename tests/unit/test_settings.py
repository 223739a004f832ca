"""Settings: one class, env names of the original design, errors that name the variable."""

from __future__ import annotations

import pytest

from consumer.comfy import ComfyClient
from consumer.settings import ComfyInstanceSettings, SettingsError, load_settings


def test_instances_from_a_comma_list_take_the_default_concurrency(monkeypatch):
    """A comma list gives one instance per URL, each with COMFYUI_MAX_CONCURRENCY slots."""
    monkeypatch.setenv("COMFYUI_INSTANCES", "http://gpu1:8188, http://gpu2:8188/")
    monkeypatch.setenv("COMFYUI_MAX_CONCURRENCY", "3")
    instances = load_settings().instances()
    assert [(i.url, i.max_concurrency) for i in instances] == [
        ("http://gpu1:8188", 3),
        ("http://gpu2:8188", 3),
    ]


def test_instances_from_json_keep_their_own_concurrency(monkeypatch):
    """A JSON list may set max_concurrency and a name per instance."""
    monkeypatch.setenv(
        "COMFYUI_INSTANCES", '[{"url": "http://a:1", "max_concurrency": 4, "name": "big"}]'
    )
    (instance,) = load_settings().instances()
    assert (instance.label, instance.max_concurrency) == ("big", 4)


def test_the_single_base_url_of_the_original_design_still_works(monkeypatch):
    """COMFYUI_BASE_URL alone gives a pool of one."""
    monkeypatch.setenv("COMFYUI_BASE_URL", "http://comfy:8188")
    assert [i.url for i in load_settings().instances()] == ["http://comfy:8188"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("IMAGE_MAX_BYTES", "lots"), ("AMQP_HEARTBEAT_S", "60"), ("LOG_LEVEL", "chatty")],
)
def test_a_bad_value_stops_start_up_naming_the_variable(monkeypatch, name, value):
    """The error names the environment variable that is wrong."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_instance_labels_and_urls_never_carry_credentials():
    """user:password in an instance URL goes to an Authorization header, not to labels or logs."""
    settings = ComfyInstanceSettings(url="http://user:secret@gpu1:8188")
    client = ComfyClient(settings.url)
    assert settings.label == "gpu1:8188"
    assert client.base_url == "http://gpu1:8188"
    assert "secret" not in repr(client)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "sidecar.example", ""])
@pytest.mark.parametrize("token", [None, ""])
def test_a_reachable_sidecar_without_a_token_stops_start_up(monkeypatch, host, token):
    """A non-loopback SIDECAR_HOST with no (or an empty) SIDECAR_TOKEN is refused, saying how."""
    monkeypatch.setenv("SIDECAR_HOST", host)
    if token is not None:
        monkeypatch.setenv("SIDECAR_TOKEN", token)
    with pytest.raises(SettingsError, match="SIDECAR_TOKEN") as refused:
        load_settings()
    assert "SIDECAR_HOST" in str(refused.value)
    assert "127.0.0.1" in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST"])
def test_a_loopback_sidecar_needs_no_token(monkeypatch, host):
    """Loopback hosts start without a token; an empty token counts as none."""
    monkeypatch.setenv("SIDECAR_HOST", host)
    monkeypatch.setenv("SIDECAR_TOKEN", "")
    assert load_settings().sidecar_token is None


def test_the_default_sidecar_binds_loopback_and_starts():
    """With no sidecar settings the service binds 127.0.0.1 and needs no token (quick start)."""
    settings = load_settings()
    assert (settings.sidecar_host, settings.sidecar_token) == ("127.0.0.1", None)


def test_a_token_opens_any_host(monkeypatch):
    """A non-loopback host starts once SIDECAR_TOKEN is set; the token never shows in repr."""
    monkeypatch.setenv("SIDECAR_HOST", "0.0.0.0")
    monkeypatch.setenv("SIDECAR_TOKEN", "0123abcd")
    settings = load_settings()
    assert settings.sidecar_token is not None
    assert settings.sidecar_token.get_secret_value() == "0123abcd"
    assert "0123abcd" not in repr(settings)


@pytest.mark.parametrize("token", [" ", "two words", "caf\u00e9"])
def test_a_token_no_client_can_send_plainly_is_refused(monkeypatch, token):
    """Tokens are visible ASCII without spaces, so every client sends them byte for byte."""
    monkeypatch.setenv("SIDECAR_TOKEN", token)
    with pytest.raises(SettingsError, match="SIDECAR_TOKEN"):
        load_settings()
