"""Service settings: every field from an environment variable ``UEMBED_<FIELD>``.

Built by :func:`load_settings` (never at import), so tests construct their own. Each
field's description says what it trades off; ``uembed serve --help`` and the README
list them.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from uembed.contract.errors import UembedError


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UEMBED_", extra="ignore")

    # --- what to serve ------------------------------------------------------------------
    bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Bundle directories to load at start (JSON list or comma-separated). Empty: the demo "
        "bundle, trained on MovieLens-100K the first time (needs the `train` extra).",
    )
    bundle_store: Path = Field(
        Path("bundles"),
        description="Root of `<name>/<version>/` bundle directories that POST /v1/models/{name}/load reads from.",
    )
    reload_token: SecretStr | None = Field(
        None,
        description="Bearer token for the admin calls: POST /v1/models/{name}/load, POST and DELETE "
        "/v1/models/{name}/versions/{version}, PUT and DELETE /v1/models/{name}/routing. Unset: they answer 404 (off).",
    )
    desired_state_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often each worker reads the desired state of versions and routing that the admin calls "
        "record (docs/ROUTING.md) and converges to it: the delay before other workers and replicas follow an admin "
        "call. Shorter follows sooner, at one small read (Redis or the state file) per worker per period.",
    )
    desired_state_file: Path | None = Field(
        None,
        description="Where the desired state lives without redis_url: a JSON file that every worker and replica "
        "must reach (a shared volume). Unset: .uembed-desired-state.json in bundle_store. With redis_url it lives "
        "in Redis instead (<redis_prefix>:desired-state).",
    )
    shadow_queue: int = Field(
        1024,
        ge=1,
        description="Copies of requests waiting for a shadow version (docs/ROUTING.md). When full, copies are "
        "dropped (counted in uembed_shadow_requests_total): a slow shadow never delays or fails served requests; "
        "a longer queue holds more of a burst at the cost of memory (each copy holds its request's examples).",
    )
    dense_backend: Literal["onnx", "torchscript"] = Field(
        "onnx",
        description="onnx: the bundle's dense.onnx on ONNX Runtime (CUDA when present, no torch needed). "
        "torchscript: the bundle's full model.pt (float32 bundles under the full-model size limit; needs torch; "
        "rows then come from the TorchScript tables, not the row store).",
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="Where a batch is scored. cpu: everything on the host. cuda (or cuda:N): tier 1 (hot rows) "
        "in GPU memory, rows gathered and embeddings assembled on the GPU, the dense net on ONNX Runtime's CUDA "
        "provider with I/O binding; misses come from Redis / the row files and go up in one copy per batch. Needs "
        "a CUDA device and the `gpu` extra (onnxruntime-gpu, CuPy); refused at start without them.",
    )
    device_hot_rows_bytes: int = Field(
        2**30,
        ge=0,
        description="With device=cuda: tier 1 budget per model in GPU memory, in bytes of float32 rows "
        "(dim x 4 bytes a row, whatever the bundle's row dtype), admitted by access frequency like the host "
        "tier; hot_rows_bytes is then unused. The GPU also holds per-batch buffers and the dense net's arena.",
    )
    device_tf32: bool = Field(
        False,
        description="With device=cuda: let the dense net's matmuls use TF32 (inputs rounded to 10-bit mantissas). "
        "Faster for wide nets, but scores then differ from the CPU path's by about 1e-4 instead of 1e-6.",
    )
    compute_threads: int = Field(
        1, ge=1, description="Intra-op threads of the dense network. 1 is fastest per core here: scale with workers."
    )

    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service (inference.GRPCInferenceService), served "
        "in each worker's event loop beside HTTP, over the same engine and batcher. 8001, as Triton. 0: no gRPC. "
        "`uembed serve --workers N` binds it once and its workers share that socket, spreading connections (not calls) evenly; "
        "no other server can bind it (it stops with a message instead). With grpcio, or plain `uvicorn --workers`, each worker binds it (SO_REUSEPORT).",
    )
    grpc_host: str = Field(
        "127.0.0.1",
        description="Address the gRPC service binds (`uembed serve --host` sets it too; 0.0.0.0 in a container).",
    )
    grpc_server: Literal["http2", "grpcio"] = Field("http2", description="http2: gRPC on uvicorn's HTTP/2 in each "
        "worker's event loop (a call reaches the batcher as an HTTP request does); grpcio: grpcio's asyncio server on a "
        "thread of its own. The same methods and error table; http2 refuses compressed messages, grpcio takes them.")

    # --- batching and admission ---------------------------------------------------------
    max_batch_ids: int = Field(
        16384,
        ge=1,
        description="A batch closes once its examples look up this many row ids (slots; a ranking request's "
        "context counts once, so several ranking requests share a batch). Larger batches amortise the dense call but "
        "hold early requests longer. One request bigger than this is its own batch.",
    )
    max_wait_ms: float = Field(0.0, ge=0, description="Extra time every batch waits for more requests after the first "
        "arrives. 0: batch what queued while the previous batch ran (lowest latency when idle). uvloop's timers count "
        "whole milliseconds: a wait under about half a millisecond is one turn of the loop, as 0 is.")
    busy_poll_ms: float = Field(0.0, ge=0, le=1000, description="After a batch, poll for the next request this long "
        "before sleeping: a core that sleeps comes back slower (docs/LOADTEST.md). Costs a core while requests are sparse "
        "(CPU a container's limit counts) and saturated requests/s where the load shares its cores. 0: sleep at once.")
    max_queue_examples: int = Field(
        8192,
        ge=1,
        description="Admission bound: examples waiting to be scored. Past it a request gets 503 with "
        "Retry-After at once instead of waiting; lower it to keep admitted latency tighter.",
    )
    request_timeout_ms: float = Field(
        2000.0, gt=0, description="Per-request deadline, queueing included. Past it: 504, never a hang."
    )

    compute_on_event_loop: bool = Field(
        True,
        description="On the CPU with local rows, run each batch on the event loop's thread between its reads and "
        "writes. False: on a compute thread beside it. The loop serves more requests/s (docs/BENCHMARKS.md, issue "
        "#13): a compute thread spends its time handing the GIL back and forth with the loop and gains no parallel "
        "work. On the loop, a request that arrives during a batch is read, admitted or refused (max_queue_examples) "
        "when the batch ends, and its deadline (request_timeout_ms) is checked between batches, not during one. A "
        "compute thread is used anyway where a batch can wait: with Redis in the rows' path (redis_url, "
        "row_source=redis) and on CUDA.",
    )
    gc_gen0_threshold: int = Field(
        50_000,
        ge=0,
        description="Allocations between young-generation garbage collections (Python's default is 700). "
        "A request allocates thousands of short-lived objects; collecting less often gives more throughput and "
        "a lower p99 under load (docs/LOADTEST.md). 0 keeps Python's default.",
    )

    # --- request limits (4xx beyond them) ----------------------------------------------
    max_examples: int = Field(1024, ge=1, description="Most examples in one request (422 beyond).")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body in bytes (413 beyond).")
    max_value_chars: int = Field(256, ge=1, description="Longest string value of a feature (422 beyond).")
    max_list_values: int = Field(256, ge=1, description="Longest list of a multivalent feature in a request (422 beyond).")
    require_features: bool = Field(
        False,
        description="Whether an example must give every feature of the model (a ranking request's context counts): "
        "true refuses one that leaves a feature out with a 422 naming them, so a client that renamed a field "
        "finds out at once; false scores it with the missing value's row (counted in "
        "uembed_missing_features_total), which lets clients send only what they have.",
    )
    body_timeout_ms: float = Field(
        10_000, gt=0,
        description="Longest wait for a request's body once its headers arrived (408 and the connection closed "
        "beyond): a client that dribbles its body cannot hold a connection.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0,
        description="Longest wait for a connection's request line and headers, from its opening or its previous "
        "response; beyond it the connection is closed (`uembed serve`). A shorter wait frees the connections of "
        "clients that stall or send half a request sooner (they count against max_connections), but cuts off "
        "slow clients on poor links.",
    )
    max_connections: int = Field(
        1000, ge=1,
        description="Most open connections per worker process; beyond it new connections get 503 (uvicorn's "
        "limit_concurrency). Set the proxy's own limits below it (README, Production settings).",
    )
    accept_defer_ms: float = Field(20, ge=0, description="With several workers, the longest a new connection is left "
                                   "to a worker holding fewer open connections: a pool opened at once spreads evenly, "
                                   "its set-up delayed as long at most. 0: the first worker to wake takes it.")
    value_cache_bytes: int = Field(
        32 * 2**20, ge=0,
        description="Bytes per model for recent values' canonical forms and rows, where a value takes the checked "
        "path: a ranking request's context, values other than plain strings, integers, lists of them and a numeric "
        "feature's finite numbers, and every value without the compiled extension (columns of plain values take one "
        "compiled pass instead, cheaper than a cache hit). Emptied when full. 0 turns the caches off.",
    )

    # --- row store ----------------------------------------------------------------------
    hot_rows_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="Tier 1 (in-process hot rows) budget per model, in bytes of decoded float32 rows (dim x 4 a "
        "row, whatever the bundle's codec: a hot row is decoded once, not on each batch, so a compressed codec holds "
        "fewer hot rows in these bytes than its row files hold in theirs). Rows are admitted "
        "by access frequency. 0 turns tier 1 off. Tier 1 also keeps an index beside the budget, the smaller "
        "of 16-32 bytes per row the budget holds (a hash table, allocated at start) and 4 bytes per table row "
        "(resident only where rows were cached): uembed_table_memory_bytes{tier=\"index\"}.",
    )
    row_checks: Literal["background", "startup"] = Field(
        "background",
        description="When the sha256 of the bundles' row files (gigabytes at Criteo scale) is checked. background: "
        "a bundle with 64 MiB of row files or more starts at once (liveness, metrics) and reads each row file once on a thread; /readyz and "
        "/v1/score answer 503 until every check passes, and a failed check keeps the model unservable (the "
        "detail says which file). startup: checked before the worker starts serving. Either way each worker "
        "reads each byte once, which also brings the rows into the page cache. Reloads always check before switching.",
    )
    verify_rows: Literal["once", "always"] = Field(
        "once",
        description="How often a bundle file's sha256 is read. once: the first check that passes stamps the file "
        "(<bundle>/.verified.json, else the user's cache; `uembed export` and `uembed publish` stamp what they "
        "check), and a restart or another worker trusts the stamp while the file's device, inode, size, mtime and "
        "ctime are unchanged: it maps the files without reading them, and any write through the filesystem is still "
        "caught. What a stamp cannot see is bytes changed under the filesystem (a failing disk). always: every load "
        "reads every byte (each worker, each restart), as row_checks says.",
    )
    row_source: Literal["files", "redis"] = Field(
        "files",
        description="Where rows come from past tiers 1 and 2. files: the bundle's memory-mapped row files (Redis, "
        "if set, is a cache: its misses and failures fall through to the files). redis: rows live only in Redis "
        "(redis_url, typically a Redis Cluster), published there by `uembed publish`; the bundle directory needs "
        "no row files (manifest, vocabularies and dense graph only). /readyz answers 503 until the publication's "
        "completion marker matches the manifest, and a batch whose rows Redis cannot give (down, failing over, "
        "missing) gets 503 rows_unavailable, never zero rows. Give that Redis maxmemory-policy noeviction.",
    )
    redis_url: str | None = Field(
        None,
        description="Tier 2, shared by replicas: redis://host:port/db (one Redis), or redis+cluster://host:port "
        "(a Redis Cluster: any one node, the client discovers the rest; rediss:// and rediss+cluster:// for TLS). "
        "Unset (the default): tiers 1 and 3 only.",
    )
    redis_timeout_ms: float | None = Field(None, gt=0, description="Socket timeout of Redis calls. Unset: 50 ms "
        "with row_source=files, where a timeout is a miss and the rows come from the row files; with row_source=redis, "
        "where it fails the batch (503) and Redis is skipped for redis_retry_s, 500 ms (at most a quarter of "
        "request_timeout_ms), so that a pause of Redis's own (a fork, a slow command) is waited out. Keep it well "
        "under request_timeout_ms.")
    redis_retry_s: float = Field(1.0, ge=0, description="After a Redis error, skip Redis for this long before "
        "trying again (no timeout paid per request while it is down; picked up again without a restart once it is back).")
    redis_bucket_rows: int = Field(
        64,
        ge=1,
        le=512,
        description="Rows per Redis hash. Packing rows into small hashes costs far less memory than a key "
        "per row, but Redis then evicts a bucket at a time. Keep it at most Redis' hash-max-listpack-entries "
        "(128 by default) and rows at most hash-max-listpack-value bytes, or hashes lose their compact encoding.",
    )
    redis_prefix: str = Field("uembed", description="Key prefix: <prefix>:<model>:<version>:<table>:<bucket>.")
    redis_fill_queue: int = Field(
        256,
        ge=0,
        description="Batches of rows waiting to be written back to Redis after a miss. When full, fills are "
        "dropped (counted): scoring never waits on a fill.",
    )

    row_updates_url: str | None = Field(
        None,
        description="Redis (one server, redis:// rediss:// or unix://) holding the row-update streams, "
        "<redis_prefix>:<model>:<version>:updates, that `uembed push-rows` and `uembed train --publish-updates` "
        "write (docs/UPDATES.md). Every worker reads every update and applies it between batches to tier 1, an "
        "overlay in front of the row files, and (forgetting the cached rows) tier 2; a version loaded or reloaded "
        "replays its stream before it serves. It may be redis_url's server; give it maxmemory-policy noeviction, or "
        "an evicted stream takes the updates a restarting replica replays. Unset (the default): no updates read.",
    )

    @field_validator("bundles", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ValueError(f"{parts.scheme or 'no'} scheme: use redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://")
        if parts.scheme.endswith("+cluster") and parts.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: leave the database number out")
        return value

    @field_validator("row_updates_url")
    @classmethod
    def _row_updates_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("use redis://, rediss:// or unix://: the streams live on one Redis server (a stream is one "
                             "key, and a replica reads all of its versions' streams in one call)")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _timeouts_fit(self) -> ServiceSettings:
        if self.redis_timeout_ms is None:
            self.redis_timeout_ms = min(500.0, self.request_timeout_ms / 4) if self.row_source == "redis" else 50.0
        if self.redis_url and self.redis_timeout_ms >= self.request_timeout_ms:
            raise ValueError(
                f"redis_timeout_ms ({self.redis_timeout_ms}) must be below request_timeout_ms "
                f"({self.request_timeout_ms}), or a slow Redis would time out every request"
            )
        if self.row_source == "redis" and not self.redis_url:
            raise ValueError("row_source=redis serves rows that live only in Redis: set redis_url")
        if self.row_source == "redis" and self.dense_backend != "onnx":
            raise ValueError("row_source=redis looks rows up in Redis; dense_backend=torchscript carries its own tables: use onnx")
        if self.row_updates_url and self.dense_backend != "onnx":
            raise ValueError("row updates change the row store's rows; dense_backend=torchscript carries its own tables: use onnx")
        if self.device != "cpu" and self.dense_backend != "onnx":
            raise ValueError(f"device={self.device} runs the dense net on ONNX Runtime: use dense_backend=onnx")
        if self.reload_token is not None and len(self.reload_token.get_secret_value()) < 16:
            raise ValueError("reload_token must be at least 16 characters")
        return self


# UEMBED_* variables that are not service settings, and what reads each: any other is a misspelt setting.
NOT_SETTINGS = {
    "UEMBED_HOST": "`uembed serve`'s --host when not given",
    "UEMBED_PORT": "`uembed serve`'s --port when not given; docker-compose.yml's published port",
    "UEMBED_WORKERS": "`uembed serve`'s --workers when not given; docker-compose.yml's workers per replica",
    "UEMBED_REPLICAS": "docker-compose.yml's replicas of the service",
    "UEMBED_CACHE": "where training keeps downloaded data sets (uembed/model/data/movielens.py, the Dockerfile)",
    "UEMBED_PURE_PYTHON": "1: hash in pure Python even where the compiled extension is built (uembed/contract/hashing.py); training coalesces with torch (uembed/model/optim.py); the service assembles with numpy (uembed/serving/pipeline/stages.py); the int2 export searches its ranges in numpy (uembed/bundle/codecs.py)",
    "UEMBED_REQUIRE_EXTENSION": "1: the tests fail where the compiled hashing extension is not built",
}


def check_variable_names(environ=os.environ) -> None:
    """Refuse an environment variable UEMBED_* that is neither a setting nor in NOT_SETTINGS, naming the closest
    setting: a misspelt setting would otherwise leave its default in force without a word."""
    known = [f"UEMBED_{name.upper()}" for name in ServiceSettings.model_fields] + list(NOT_SETTINGS)
    for name in sorted(environ):
        if name.upper().startswith("UEMBED_") and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1)
            hint = f"did you mean {close[0]}?" if close else "`uembed serve --help` lists the settings"
            raise UembedError(f"unknown setting {name}: {hint}")


def load_settings(**overrides) -> ServiceSettings:
    """Settings from the environment, with explicit overrides (CLI flags, tests) winning; an unknown UEMBED_*
    variable is refused (check_variable_names)."""
    check_variable_names()
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"UEMBED_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']}" for e in exc.errors())
        raise UembedError(f"invalid settings: {problems}") from None


def describe_settings() -> str:
    """One line per setting: environment variable, default and description (for --help and docs)."""
    lines = []
    for name, field in ServiceSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else repr(default)  # the description says what unset means
        lines.append(f"UEMBED_{name.upper()} (default {shown}): {field.description}")
    return "\n".join(lines)
