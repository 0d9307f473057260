"""Every setting of the system, in one pydantic-settings class.

Values come from the environment and an optional `.env` file, with embedded
defaults so one machine needs nothing installed by hand: no `REDIS_URL` means a
private `redis-server` is started, no `DATABASE_URL` means SQLite in the data
folder. The well-known names (`REDIS_URL`, `DATABASE_URL`, `TELEGRAM_TOKEN`,
`DISCORD_TOKEN`) are read as they are; everything else is `CARBOT_<NAME>`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url


def _usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's cpuset, `taskset`), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _alias(name: str) -> AliasChoices:
    return AliasChoices(name, f"CARBOT_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Where things live.
    redis_url: str | None = Field(default=None, validation_alias=_alias("REDIS_URL"))
    database_url: str | None = Field(default=None, validation_alias=_alias("DATABASE_URL"))
    data_dir: Path = Path("data")
    model_registry: Path | None = None  # defaults to <data_dir>/models

    # The classify queue and its batcher (TF Serving's max_batch_size / batch_timeout_micros).
    classify_queue: str = "classify"
    max_batch: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=5.0, ge=0)
    # One photo decoding thread a CPU core the worker may use: more only wait for the same cores (on 2 cores the
    # serving benchmark's (d) ran 1.03 times as fast with 2 threads as with 4, 8 rounds taking turns).
    decode_threads: int = Field(default_factory=_usable_cores, ge=1)
    # What runs the forward pass (model.RUNTIME_CHOICES): auto serves the fastest verified variant on a CPU
    # and TensorFlow on a GPU; a named one serves if it can, else the worker falls back and logs why.
    runtime: Literal["auto", "tensorflow", "onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8"] = "auto"

    # Backpressure: a full queue answers "busy" at once; a request past its deadline is a timeout.
    queue_limit: int = Field(default=500, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)

    # Job lifetimes. A worker vouches for its running batch every heartbeat_ttl_s / 5; a dead worker's batch
    # runs again once heartbeat_ttl_s has passed without a beat, at the next maintenance of any worker
    # (every maintenance_interval_s). The job timeout is only plain RQ workers' limit on one job.
    heartbeat_ttl_s: float = Field(default=5.0, ge=0.5)
    job_timeout_s: int = Field(default=30, ge=1)
    job_retries: int = Field(default=2, ge=0)
    image_ttl_s: int = Field(default=900, ge=1)
    result_ttl_s: int = Field(default=600, ge=1)
    maintenance_interval_s: int = Field(default=2, ge=1)

    # Retraining (`/retrain`): a job on its own queue, served by `carbot train-worker`.
    train_queue: str = "train"
    base_dataset: Path | None = None  # labelled photos (folder per class or CSV manifest) trained alongside feedback
    retrain_epochs: int = Field(default=5, ge=1)
    # The recipe's base rate (fine-tuning runs at 1/5 to 1/10 of it); unset: the one the active model was trained with.
    retrain_learning_rate: float | None = Field(default=None, gt=0)
    retrain_timeout_s: int = Field(default=6 * 3600, ge=60)  # a longer run is stopped and marked failed
    # What one person can put into one retrain: their latest labelled photos, of which this many corrections at most.
    retrain_photos_per_person: int = Field(default=100, ge=1)
    retrain_corrections_per_person: int = Field(default=25, ge=0)
    # A retrain on the classify worker's machine gives way to photos: lowest CPU priority, and a pause between
    # training steps while photos wait (training.share_machine). Off for a train worker with a machine of its own.
    retrain_yield: bool = True

    # Chat platforms (used by the bots).
    telegram_token: SecretStr | None = Field(default=None, validation_alias=_alias("TELEGRAM_TOKEN"))
    discord_token: SecretStr | None = Field(default=None, validation_alias=_alias("DISCORD_TOKEN"))
    admin_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)  # "telegram:123", "discord:456"
    telegram_api_base_url: str | None = Field(default=None, validation_alias=_alias("TELEGRAM_API_BASE_URL"))
    telegram_file_base_url: str | None = Field(default=None, validation_alias=_alias("TELEGRAM_FILE_BASE_URL"))
    telegram_webhook_url: str | None = Field(default=None, validation_alias=_alias("TELEGRAM_WEBHOOK_URL"))
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = 8443
    discord_guild_id: int | None = None  # sync slash commands to this guild at once (global sync takes up to an hour)
    photo_retention_days: int = Field(default=90, ge=0)  # 0 keeps no photos
    rate_limit_per_minute: int = Field(default=10, ge=1)

    # Operations: what a process tells its operator. The port serves /metrics, /healthz and /readyz.
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line, for a log collector
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # unset: no endpoint
    metrics_listen: str = "0.0.0.0"

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _split_admin_ids(cls, value: object) -> object:
        # "tg:123, discord:456" in the environment; a list when built in code.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def with_overrides(self, **values: object) -> Settings:
        """These settings with `values` in place of their own, validated as the environment's are.

        A None value keeps the setting (an option nobody gave on the command line); a name that
        is no setting, or a value out of its range, raises.
        """
        unknown = set(values) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"no such setting: {', '.join(sorted(unknown))}")
        given = {name: value for name, value in values.items() if value is not None}
        if not given:
            return self
        # Validated from field names, not read again from the environment (model_validate skips the sources).
        return type(self).model_validate({**self.model_dump(), **given})

    @property
    def registry_dir(self) -> Path:
        """The model registry: `CARBOT_MODEL_REGISTRY`, or `models` in the data folder."""
        return self.model_registry or self.data_dir / "models"

    @property
    def photo_dir(self) -> Path:
        """The photo store: every photo people sent, by its SHA-256, for retraining (see `photo_retention_days`)."""
        return self.data_dir / "photos"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'carbot.db').resolve()}"

    @property
    def sql_url(self) -> str:
        """The database: `DATABASE_URL` with its driver made explicit, or SQLite in the data folder."""
        return normalize_database_url(self.database_url or self.sqlite_url).render_as_string(hide_password=False)


def normalize_database_url(url: str) -> URL:
    """The URL with a PostgreSQL driver made explicit: psycopg 3 is the one this project installs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
