"""Service settings: environment variables, defaults, and the combinations refused at start."""

import pytest

from uembed.contract.errors import UembedError
from uembed.serving.settings import ServiceSettings, describe_settings, load_settings


@pytest.mark.parametrize("settings,message", [
    ({"UEMBED_RELOAD_TOKEN": "short"}, "reload_token"),
    ({"UEMBED_REDIS_URL": "redis://127.0.0.1:1", "UEMBED_REDIS_TIMEOUT_MS": "5000"}, "redis_timeout_ms"),
    ({"UEMBED_MAX_BATCH_IDS": "0"}, "UEMBED_MAX_BATCH_IDS"),
])  # fmt: skip
def test_unsafe_settings_are_refused(settings, message, monkeypatch):
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UembedError, match=message):
        load_settings()


@pytest.mark.parametrize("settings,message", [
    ({"UEMBED_BODY_TIMEOUT_MS": "0"}, "UEMBED_BODY_TIMEOUT_MS"),
    ({"UEMBED_MAX_CONNECTIONS": "0"}, "UEMBED_MAX_CONNECTIONS"),
    ({"UEMBED_VALUE_CACHE_BYTES": "-1"}, "UEMBED_VALUE_CACHE_BYTES"),
    ({"UEMBED_MAX_EXAMPLES": "many"}, "UEMBED_MAX_EXAMPLES"),
])  # fmt: skip
def test_each_setting_is_checked_and_named(settings, message, monkeypatch):
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UembedError, match=message):
        load_settings()


def test_environment_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("UEMBED_BUNDLES", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("UEMBED_VALUE_CACHE_BYTES", "1024")
    settings = load_settings(max_connections=7)
    assert [p.name for p in settings.bundles] == ["a", "b"]
    assert (settings.value_cache_bytes, settings.max_connections) == (1024, 7)


def test_every_setting_is_described():
    text = describe_settings()
    for name in ServiceSettings.model_fields:
        assert f"UEMBED_{name.upper()}" in text
    # a setting with no fixed default reads as unset, and its description says what that means
    assert "UEMBED_REDIS_TIMEOUT_MS (default unset): Socket timeout of Redis calls. Unset: 50 ms" in text
    assert "(default None)" not in text


def test_the_redis_timeout_defaults_by_where_the_rows_live():
    # a cache: a timeout is a miss served from the row files; the only copy: a timeout fails the batch
    assert load_settings(redis_url="redis://127.0.0.1:1").redis_timeout_ms == 50.0
    assert load_settings(redis_url="redis://127.0.0.1:1", row_source="redis").redis_timeout_ms == 500.0
    assert load_settings(redis_url="redis://127.0.0.1:1", row_source="redis", request_timeout_ms=800).redis_timeout_ms == 200.0
    assert load_settings(redis_url="redis://127.0.0.1:1", row_source="redis", redis_timeout_ms=30).redis_timeout_ms == 30.0
