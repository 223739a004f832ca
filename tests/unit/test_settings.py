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
