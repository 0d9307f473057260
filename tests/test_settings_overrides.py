"""`Settings.with_overrides`: what a command-line option does to the settings read from the environment."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from carbot.cli import main
from carbot.settings import Settings


def test_given_values_replace_the_settings_and_none_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBOT_MAX_WAIT_MS", "9")
    monkeypatch.setenv("REDIS_URL", "redis://from-the-environment")
    settings = Settings(max_batch=16, telegram_token="secret")
    monkeypatch.setenv("CARBOT_MAX_WAIT_MS", "1")  # read once: a later change of the environment is not picked up

    changed = settings.with_overrides(max_batch=8, max_wait_ms=None)

    assert changed.max_batch == 8 and changed.max_wait_ms == 9.0
    assert changed.redis_url == "redis://from-the-environment"
    assert changed.telegram_token is not None and changed.telegram_token.get_secret_value() == "secret"
    assert settings.max_batch == 16  # the original is unchanged
    assert settings.with_overrides(max_batch=None) is settings


def test_values_are_validated_and_unknown_names_refused() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.with_overrides(max_batch=0)
    with pytest.raises(ValidationError):
        settings.with_overrides(runtime="abacus")
    assert settings.with_overrides(max_wait_ms="2.5").max_wait_ms == 2.5  # coerced as from the environment
    with pytest.raises(ValueError, match="no such setting: max_batches"):
        settings.with_overrides(max_batches=4)


def test_the_worker_command_refuses_an_option_out_of_range() -> None:
    result = CliRunner().invoke(main, ["worker", "--max-batch", "0"])
    assert result.exit_code == 2 and "max_batch" in result.output


def test_the_settings_own_the_values_derived_from_them(tmp_path) -> None:
    """Every process finds the database, the photo store and the registry the same way: from the settings."""
    settings = Settings(data_dir=tmp_path, database_url=None, model_registry=None)
    assert settings.sql_url == f"sqlite:///{(tmp_path / 'carbot.db').resolve()}"
    assert settings.photo_dir == tmp_path / "photos" and settings.registry_dir == tmp_path / "models"
    # The URL a hosting provider hands out names no driver: psycopg 3 is the one installed.
    hosted = Settings(database_url="postgres://carbot:p%40ss@db.example:5432/carbot")
    assert hosted.sql_url == "postgresql+psycopg://carbot:p%40ss@db.example:5432/carbot"


def test_the_worker_decodes_on_one_thread_a_core_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARBOT_DECODE_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)  # a container's cpuset
    assert Settings().decode_threads == 3
    monkeypatch.setenv("CARBOT_DECODE_THREADS", "8")  # an operator's choice stands
    assert Settings().decode_threads == 8
