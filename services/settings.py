"""Service settings from ``EXCB_*`` environment variables (pydantic-settings).

One class for every service so compose files, manifests and tests share the same names. Nested values use
``__`` (``EXCB_EMBED__MAX_BATCH=64``). Secrets may be given as files: ``EXCB_API_KEYS_FILE``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All settings; see README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="EXCB_", env_nested_delimiter="__", extra="ignore")

    # --- shared -------------------------------------------------------------------------------------
    home: Path = Field(Path(".excb"), description="state directory: sqlite db, runs, models, broker files")
    data_roots: list[Path] = Field(default_factory=list, description="dataset/image paths must resolve inside one of these")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (hashed in memory); unset = no auth")
    log_level: str = "INFO"
    log_json: bool = True

    # --- control plane / workers (owned by services/api, services/worker) ----------------------------
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite under home")
    redis_url: str | None = Field(None, description="Celery broker; default: an embedded SQLite transport under home")
    max_attempts: int = Field(3, ge=1)
    heartbeat_seconds: float = Field(5.0, gt=0)
    stall_seconds: float = Field(120.0, gt=0)
    cancel_grace_seconds: float = Field(30.0, gt=0)
    max_running_jobs_per_key: int = Field(2, ge=1)

    # --- embed service (owned by services/embed) ------------------------------------------------------
    models_dir: Path | None = Field(None, description="registry of exported bundles; default home/models")

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or (self.home / "models")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
