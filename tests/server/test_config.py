"""KAIZEN_* variables that are no setting are warned about, with the closest real name, instead
of being silently ignored."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from server.config import Settings, unknown_settings


def test_a_stale_or_misspelt_variable_is_named_with_the_closest_setting() -> None:
    environ = {
        "KAIZEN_ROLLOUT_TOLERANCE": "0.02",  # a setting an older version had
        "KAIZEN_LOGLEVEL": "debug",
        "KAIZEN_PORT": "8001",  # a real setting
        "KAIZEN_TOKEN": "kz_x",  # the CI clients' own
        "PATH": "/usr/bin",
    }
    warnings = unknown_settings(environ)
    assert warnings == [
        "KAIZEN_LOGLEVEL is not a Kaizen setting and is ignored; did you mean KAIZEN_LOG_LEVEL?",
        "KAIZEN_ROLLOUT_TOLERANCE is not a Kaizen setting and is ignored",
    ]
    # Every real setting passes.
    assert unknown_settings({f"KAIZEN_{n.upper()}": "" for n in Settings.model_fields}) == []


def test_kaizen_serve_logs_the_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from kaizen.cli import app
    from server.config import get_settings

    monkeypatch.setenv("KAIZEN_HOME", str(tmp_path))
    monkeypatch.setenv("KAIZEN_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    monkeypatch.setenv("KAIZEN_MAX_TOKENS_LIMT", "9")
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kaizen.config"):
            result = CliRunner().invoke(app, ["serve"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1  # the database is not migrated: it stops there
    assert "KAIZEN_MAX_TOKENS_LIMT is not a Kaizen setting" in caplog.text
    assert "did you mean KAIZEN_MAX_TOKENS_LIMIT?" in caplog.text
