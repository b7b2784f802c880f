"""Service settings from ``EXCB_*`` environment variables (pydantic-settings).

One class for every service so compose files, manifests and tests share the same names. Nested values use
``__`` (``EXCB_EMBED__MAX_BATCH=64``). Secrets may be given as files: ``EXCB_API_KEYS_FILE``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class EmbedSettings(BaseModel):
    """Embed service knobs (``EXCB_EMBED__<NAME>``); owned by services/embed. Defaults suit a CPU box."""

    model_config = ConfigDict(extra="forbid")

    batching: bool = Field(True, description="merge concurrent requests into micro-batches (off: one run per request)")
    max_batch: int = Field(32, ge=1, le=4096, description="images per ONNX Runtime run")
    max_delay_ms: float = Field(5.0, ge=0.0, le=1000.0, description="how long the first queued image waits for company")
    batch_budget_ms: float = Field(
        100.0, gt=0.0, description="one ONNX Runtime run's expected time may not exceed this: caps the adaptive "
                                   "batch size (services/embed/batch_policy.py)")
    queue_size: int = Field(256, ge=1, description="images waiting or running per model; beyond it 503 + Retry-After")
    retry_after_seconds: int = Field(1, ge=1)
    request_timeout_seconds: float = Field(30.0, gt=0.0, description="queued work older than this is dropped (503)")
    max_images_per_request: int = Field(64, ge=1, description="more images in one request -> 413")
    max_image_bytes: int = Field(20_000_000, ge=1024, description="one encoded image")
    max_request_bytes: int = Field(64_000_000, ge=1024, description="one request body (counted while streaming)")
    max_pixels: int = Field(40_000_000, ge=64, description="decompression-bomb cap (header check before decode)")
    decode_pixel_budget: int = Field(
        80_000_000, ge=64, description="pixels decoded at once across all requests (~11 bytes each while decoding); "
                                       "raised to max_pixels if lower")
    decode_wait_seconds: float = Field(
        5.0, ge=0.0, description="how long a decode waits for room in that budget; then 503 + Retry-After")
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
    url_allowed_hosts: list[str] = Field(default_factory=list,
                                         description="hosts GET /embed may fetch; empty = URLs off")
    url_allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs an allowed host may resolve into even though they are not public")
    url_timeout_seconds: float = Field(5.0, gt=0.0, description="one deadline for connect + redirects + body")
    url_max_concurrent: int = Field(8, ge=1, description="URL fetches in flight, on their own threads; beyond -> 503")
    url_max_redirects: int = Field(3, ge=0, le=10)
    url_request_timeout_seconds: float = Field(
        10.0, gt=0.0, description="one deadline for all of a request's URL fetches together (each fetch also has "
                                  "url_timeout_seconds); past it -> 422 fetch_timeout")
    max_request_load_bytes: int = Field(
        64_000_000, ge=1024, description="bytes one request may load from data-root paths and URLs together; "
                                         "413 before a file is read (paths) or as soon as it is passed (URLs)")
    providers: list[str] = Field(
        default_factory=list, description="ONNX Runtime providers in order (tensorrt, cuda, cpu); empty = auto. "
                                          "GPU providers listed here are required: readiness fails on CPU fallback")
    intra_op_threads: int | None = Field(None, ge=1, description="None: the cores this process may use")
    inter_op_threads: int = Field(1, ge=1)
    balance_window: int = Field(10_000, ge=1, description="served assignments kept for live balance statistics")
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)
    rescan_seconds: float = Field(0.0, ge=0.0, description="poll models_dir for new bundles; 0 = only at start")
    warmup: bool = Field(True, description="one forward pass per model before it is served")
    decode_workers: int | None = Field(
        None, ge=1, le=256, description="threads that decode + preprocess images (first come, first served); "
                                        "None: the cores this process may use")
    jpeg_draft: bool = Field(
        True, description="decode a large JPEG at 1/2, 1/4 or 1/8 scale, never below 4x the model's input size "
                          "(a 12 MP photo: 2.3-3x less decode + preprocess time); off = full decode, bit-exact pixels")


class IndexSettings(BaseModel):
    """Image index knobs (``EXCB_INDEX__<NAME>``); owned by services/index."""

    model_config = ConfigDict(extra="forbid")

    after_job: bool = Field(True, description="after a successful job, index a sample of its training images")
    sample: int = Field(10_000, ge=1, le=200_000, description="at most this many images per index (seeded sample)")
    seed: int = Field(0, description="seed of that sample")
    timeout_seconds: float = Field(1800.0, gt=0, description="an index build running longer is stopped (failed)")


class Settings(BaseSettings):
    """All settings; see README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="EXCB_", env_nested_delimiter="__", extra="ignore")

    # --- shared -------------------------------------------------------------------------------------
    home: Path = Field(Path(".excb"), description="state directory: sqlite db, runs, models, broker files")
    data_roots: list[Path] = Field(default_factory=list,
                                   description="dataset/image paths must resolve inside one of these")
    api_keys_file: Path | None = Field(None,
                                       description="file with one API key per line (hashed in memory); unset = no auth")
    api_key: SecretStr | None = Field(
        None, description="one API key (`excb serve/up --api-key`), beside the keys file's; the common one-key case")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser origins allowed to call the API (CORS), comma-separated or a "
                                          "JSON list, `*` for any; empty = CORS off (a preflight gets 405)")
    admin_keys_file: Path | None = Field(
        None, description="operators' keys, same format: they authenticate too, and also see every tenant's jobs "
                          "in GET /v1/workers and every model's series in /metrics")
    log_level: str = Field("INFO", description="root log level (third-party set-up chatter stays at WARNING)")
    log_json: bool | None = Field(None, description="JSON log lines; unset = JSON unless stderr is a terminal")

    # --- control plane / workers (owned by services/api, services/worker) ----------------------------
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite under home")
    database_password_file: Path | None = Field(
        None, description="file with the database password (compose/Kubernetes secret), put into database_url")
    redis_url: str | None = Field(None, description="Celery broker; default: an embedded SQLite transport under home")
    max_attempts: int = Field(3, ge=1)
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often workers and running jobs heartbeat")
    stall_heartbeats: int = Field(
        6, ge=2, description="missed heartbeats before a job's worker, or a worker, counts as gone")
    stall_seconds: float = Field(
        0.0, ge=0, description="heartbeat age that makes a job stalled / a worker dead; 0 = stall_heartbeats x "
                               "heartbeat_seconds (30 s by default)")
    cancel_grace_seconds: float = Field(30.0, gt=0)
    max_running_jobs_per_key: int = Field(2, ge=1)
    ops_routes_auth: Literal["auto", "on", "off"] = Field(
        "auto", description="/metrics, /v1/info, /docs, /redoc and /openapi.json of the control plane need a key: "
                            "auto = whenever API keys are configured")
    server_paths_in_responses: Literal["auto", "on", "off"] = Field(
        "auto", description="job and model responses show absolute server paths (run dir, data, bundle); auto = "
                            "only without API keys (with keys: paths relative to runs/, models/, the data root)")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1 << 30,
        description="control-plane request bodies (JSON); larger -> 413 before the body is read")
    default_memory_limit_mb: int = Field(
        0, ge=0, description="a job without memory_limit_mb gets this one (its trainer is killed and retried "
                             "above it); 0 = none")
    max_streams_per_key: int = Field(8, ge=1, description="live SSE streams (events, log follow) open at once per key")
    stream_max_seconds: float = Field(
        3600.0, gt=0, le=86400, description="longest life of one live stream (a client's max_seconds is capped to it)")
    celery_queue: str = Field("excb.jobs", description="Celery queue the training tasks travel on")
    visibility_timeout_seconds: float = Field(
        172800.0, gt=0, description="Redis redelivery of unacked tasks; far above any job (the DB lease guards)")
    requeue_after_seconds: float = Field(
        300.0, gt=0, description="a QUEUED job whose message is older than this is published again (lost messages)")
    reaper_interval_seconds: float = Field(10.0, gt=0, description="period of the stall/lost-message sweeper")
    retry_backoff_seconds: float = Field(
        10.0, ge=0, description="a job released after a counted failure (disk full, crash) is due again after this "
                                "long, doubled per failure; 0 = at once")
    retry_backoff_max_seconds: float = Field(300.0, gt=0, description="cap of that back-off")
    progress_interval_seconds: float = Field(1.0, gt=0, description="how often a worker copies metrics into the DB")
    api_url: str = Field("http://127.0.0.1:8000", description="where `excb jobs ...` finds the control plane")
    api_token: str | None = Field(None, description="bearer key `excb jobs ...` sends")
    export_parity_images: int = Field(256, ge=1, description="images the ONNX-vs-PyTorch parity check compares")
    export_staging_stale_seconds: float = Field(
        3600.0, gt=0, description="an export staging dir (models/.m-<id>.tmp) unwritten this long is what a killed "
                                  "export left: the next export removes it (keep it far above the longest export)")
    worker_restart_backoff_seconds: float = Field(
        1.0, gt=0, description="`excb up`: wait before restarting a worker that died; doubles per death in a row")
    worker_restart_backoff_max_seconds: float = Field(60.0, gt=0, description="cap of that back-off")
    worker_stable_seconds: float = Field(
        60.0, gt=0, description="a worker up this long has recovered: its back-off starts again from the base")
    worker_crash_loop_restarts: int = Field(
        3, ge=2, description="this many worker deaths within worker_crash_loop_window_seconds = a crash loop")
    worker_crash_loop_window_seconds: float = Field(300.0, gt=0)
    worker_health_file: Path | None = Field(
        None, description="a worker touches this file every heartbeat while its Celery consumer runs; "
                          "`excb worker-health` (the container health check) fails when it goes stale")

    # --- embed service (owned by services/embed) ------------------------------------------------------
    models_dir: Path | None = Field(None, description="registry of exported bundles; default home/models")
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        """``EXCB_CORS_ORIGINS=https://a.example,https://b.example`` or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return value

    @property
    def auth_configured(self) -> bool:
        """API keys exist (the keys file or ``api_key``): every ``/v1`` route needs one."""
        return self.api_keys_file is not None or self.api_key is not None

    @model_validator(mode="after")
    def _stall_from_heartbeat(self) -> "Settings":
        """The stall window follows the heartbeat interval (minutes of silence are not needed to call a worker gone)."""
        if not self.stall_seconds:
            self.stall_seconds = self.heartbeat_seconds * self.stall_heartbeats
        return self

    @model_validator(mode="after")
    def _database_password_from_file(self) -> "Settings":
        """Secrets stay files (reliability.md row 32): the URL in the environment carries no password."""
        if self.database_password_file is None or not self.database_url:
            return self
        from sqlalchemy.engine import make_url

        try:
            password = Path(self.database_password_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"database_password_file: cannot read {self.database_password_file}: {exc}") from exc
        url = make_url(self.database_url).set(password=password)
        self.database_url = url.render_as_string(hide_password=False)
        return self

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def resolved_models_dir(self) -> Path:
        """Where bundles live, absolute (``~`` expanded, symlinks resolved): the worker, the API and the embed
        service must name the same directory the same way (bundle paths in the DB and active.json)."""
        return Path(self.models_dir or (self.home / "models")).expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
