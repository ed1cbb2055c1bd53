"""Run configuration: one frozen dataclass, loaded from YAML and/or CLI flags, validated once.

The config hash covers exactly the settings that change the result (input, columns, k-means and
selection settings); it is recorded in run.json so that a resumed run can refuse a changed config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scoring.errors import BadConfig

LOG_FORMATS = ("text", "json")
METRICS = ("cosine", "l2")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Settings that do not change the keep list: where it runs, how it is reported, and credentials.
_NOT_HASHED = frozenset(
    {
        "output",
        "run_id",
        "workers",
        "address",
        "storage_options",
        "force_new",
        "quiet",
        "log_format",
        "max_retries",
        "reuse_scores_from",  # reused shards are the bytes a fresh score would write
    }
)
# Settings added after runs were made: hashed only when set to something else than this default,
# so the hash of a run made before they existed (a resume of it) stays the same.
_HASHED_UNLESS_DEFAULT = {"kmeans_backend": "auto", "kmeans_tol": None}
# Keys whose values are never written anywhere (run.json, logs, errors).
SECRET_KEYS = re.compile(r"(secret|token|password|key$|key_id|credential|session)", re.I)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. Field names are the YAML keys; CLI flags use dashes."""

    input: str
    output: str
    run_id: str = ""
    id_column: str = "id"
    embedding_column: str = "embedding"
    # raw content instead of precomputed embeddings (issue 4): one of these plus `model`
    text_column: str | None = None
    image_column: str | None = None
    model: str | None = (
        None  # sentence-transformers dir/name, open_clip/timm/torchvision, module:factory
    )
    save_embeddings: bool = False
    embed_batch_size: int | None = None  # None: sized to memory
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs
    cpus_per_worker: float | None = None  # None: 1
    k: int = 1000
    metric: str = "cosine"
    kmeans_iters: int = 20
    kmeans_backend: str = "auto"  # auto: torch where bf16 is native (CPU or CUDA), else faiss
    kmeans_tol: float | None = None  # None: exactly kmeans_iters; else faiss-style early stop
    sample_size: int | None = None  # None: 256 * k (capped at the number of rows)
    seed: int = 0
    shard_rows: int = 1_000_000
    strategy: str = "auto"
    keep_fraction: float | None = None  # default 0.5 when neither fraction nor count is given
    keep_count: int | None = None
    dedup_eps: float | str | None = None  # SemDeDup before the rule; "off": none, even for auto
    # growing datasets (issue 15): frozen prototypes, and committed scores of an older run
    prototypes_from: str | None = None  # a committed run folder or a centroids.npy file
    reuse_scores_from: str | None = None  # a run folder whose unchanged shards are copied
    dbp_temperature: float = 0.5
    label_column: str | None = None
    workers: int | None = None  # None: one per GPU, else one per CPU
    address: str | None = None  # None: embedded local Ray
    max_retries: int = 3
    force_new: bool = False  # start over instead of resuming a run id whose config/input changed
    quiet: bool = False
    log_format: str = "text"
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(self)
        # the rule's default eps, read from the registry here, on the driver: workers get the
        # config by pickle (its __dict__), and a plug-in rule is registered only where the
        # driver's code registered it
        from scoring import strategies

        rule_eps = strategies.get(self.strategy).default_dedup_eps
        object.__setattr__(self, "_rule_dedup_eps", rule_eps)

    @property
    def effective_dedup_eps(self) -> float | None:
        """--dedup-eps, else the strategy's own default (auto deduplicates), else None; None
        for "off" (YAML's unquoted `off` reads as false)."""
        if dedup_off(self.dedup_eps):
            return None
        if self.dedup_eps is not None:
            return self.dedup_eps
        return self._rule_dedup_eps

    @property
    def effective_sample_size(self) -> int:
        return self.sample_size if self.sample_size is not None else 256 * self.k

    def hashed_settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {
            k: v
            for k, v in sorted(d.items())
            if k not in _NOT_HASHED
            and not (k in _HASHED_UNLESS_DEFAULT and v == _HASHED_UNLESS_DEFAULT[k])
        }

    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_settings(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def redacted(self) -> dict[str, Any]:
        """The config as written to run.json: storage options with secrets replaced."""
        d = dataclasses.asdict(self)
        d["storage_options"] = redact(dict(self.storage_options))
        return d

    def n_keep(self, n_rows: int) -> int:
        """DESIGN §5: floor(keep_fraction × N), or an explicit keep_count capped at N."""
        if self.keep_count is not None:
            return min(self.keep_count, n_rows)
        frac = 0.5 if self.keep_fraction is None else self.keep_fraction
        # Decimal-exact floor: 0.3 * 10 must give 3, not 2.
        from fractions import Fraction

        return int(Fraction(repr(frac)) * n_rows)


def dedup_off(eps: Any) -> bool:
    return eps is False or (isinstance(eps, str) and eps.lower() == "off")


def redact(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {
            k: ("***" if SECRET_KEYS.search(str(k)) and not isinstance(v, Mapping) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _bad(key: str, value: Any, why: str) -> BadConfig:
    return BadConfig(f"config key '{key}': {why} (got {value!r})")


def validate(cfg: RunConfig) -> None:
    """Raise BadConfig (a ValueError and TypeError) naming the key and value of the first bad setting."""
    ints = ("k", "kmeans_iters", "seed", "shard_rows", "max_retries")
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadConfig(f"config key '{name}': expected an integer (got {v!r})")
    for name in ("sample_size", "keep_count", "workers"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise BadConfig(f"config key '{name}': expected an integer (got {v!r})")
    for name in (
        "run_id", "text_column", "image_column", "model", "label_column", "address",
        "prototypes_from", "reuse_scores_from",
    ):  # fmt: skip
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):  # e.g. YAML `run_id: 2026` is an int
            raise BadConfig(f"config key '{name}': expected a string (got {v!r})")
    for name in ("input", "output"):
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v:
            raise _bad(name, v, "a non-empty path or URL is required")
    for name in ("id_column", "embedding_column"):
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v:
            raise _bad(name, v, "a column name is required")
    if cfg.k < 1:
        raise _bad("k", cfg.k, "must be at least 1")
    if cfg.kmeans_iters < 1:
        raise _bad("kmeans_iters", cfg.kmeans_iters, "must be at least 1")
    from scoring.kernels.kmeans import BACKENDS

    if cfg.kmeans_backend not in BACKENDS:
        raise _bad("kmeans_backend", cfg.kmeans_backend, f"must be one of {', '.join(BACKENDS)}")
    t = cfg.kmeans_tol
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf)
    ):
        raise _bad("kmeans_tol", t, "must be a number >= 0 (relative change of the objective)")
    if cfg.shard_rows < 1:
        raise _bad("shard_rows", cfg.shard_rows, "must be at least 1")
    if cfg.sample_size is not None and cfg.sample_size < cfg.k:
        raise _bad("sample_size", cfg.sample_size, f"must be at least k = {cfg.k}")
    if cfg.metric not in METRICS:
        raise _bad("metric", cfg.metric, f"must be one of {', '.join(METRICS)}")
    from scoring import strategies  # the registry (a plug-in rule may register later)

    if cfg.strategy not in strategies.REGISTRY:
        raise _bad("strategy", cfg.strategy, f"must be one of {', '.join(strategies.REGISTRY)}")
    if cfg.keep_fraction is not None and cfg.keep_count is not None:
        raise _bad("keep_count", cfg.keep_count, "give keep_fraction or keep_count, not both")
    if cfg.keep_fraction is not None:
        f = cfg.keep_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
            raise _bad("keep_fraction", f, "must be a number with 0 < F <= 1")
    if cfg.keep_count is not None and cfg.keep_count < 0:
        raise _bad("keep_count", cfg.keep_count, "must be >= 0")
    if cfg.log_format not in LOG_FORMATS:
        raise _bad("log_format", cfg.log_format, f"must be one of {', '.join(LOG_FORMATS)}")
    if cfg.text_column is not None and cfg.image_column is not None:
        raise _bad("image_column", cfg.image_column, "give text_column or image_column, not both")
    if (cfg.text_column or cfg.image_column) and not cfg.model:
        raise _bad("model", cfg.model, "text_column/image_column need a model")
    if cfg.dedup_eps is not None and not dedup_off(cfg.dedup_eps):
        e = cfg.dedup_eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (0 <= e < 1):
            raise _bad("dedup_eps", e, "must be a number with 0 <= eps < 1, or off")
    t = cfg.dbp_temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise _bad("dbp_temperature", t, "must be a number > 0")
    for name in ("gpus_per_worker", "cpus_per_worker"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise _bad(name, v, "must be a number >= 0")
    if cfg.embed_batch_size is not None and (
        isinstance(cfg.embed_batch_size, bool)
        or not isinstance(cfg.embed_batch_size, int)
        or cfg.embed_batch_size < 1
    ):
        raise _bad("embed_batch_size", cfg.embed_batch_size, "must be an integer >= 1")
    for name in ("save_embeddings", "force_new", "quiet"):
        if not isinstance(getattr(cfg, name), bool):
            raise BadConfig(
                f"config key '{name}': expected true or false (got {getattr(cfg, name)!r})"
            )
    if cfg.workers is not None and cfg.workers < 1:
        raise _bad("workers", cfg.workers, "must be at least 1")
    if cfg.max_retries < 0:
        raise _bad("max_retries", cfg.max_retries, "must be >= 0")
    if cfg.run_id and not RUN_ID_RE.match(cfg.run_id):
        raise _bad(
            "run_id",
            cfg.run_id,
            "use letters, digits, '.', '_' and '-' only (no slashes, no '..', at most 128)",
        )
    if cfg.run_id and ".." in cfg.run_id:
        raise _bad("run_id", cfg.run_id, "must not contain '..'")
    if not isinstance(cfg.storage_options, Mapping):
        raise BadConfig(
            f"config key 'storage_options': expected a mapping (got {type(cfg.storage_options).__name__})"
        )


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a dict of known keys (dashes accepted for underscores)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise BadConfig(f"config file {path}: not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BadConfig(
            f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadConfig(
            f"config file {path}: expected a mapping of keys, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise BadConfig(f"config file {path}: unknown key '{key}'")
        out[name] = value
    return out


def make_config(settings: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from a settings mapping; missing run_id becomes a UTC timestamp."""
    settings = dict(settings)
    for required in ("input", "output"):
        if not settings.get(required):
            raise BadConfig(f"{source}: '{required}' is required (--{required} or the YAML key)")
    if not settings.get("run_id"):
        settings["run_id"] = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    if settings.get("storage_options") is None:
        settings["storage_options"] = {}
    if settings.get("prototypes_from") and ("k" not in settings or "metric" not in settings):
        # frozen prototypes bring their k (and the metric they were fitted with)
        from scoring.stages.reuse import load_prototypes

        src = load_prototypes(settings["prototypes_from"], settings["storage_options"])
        settings.setdefault("k", int(src.centroids.shape[0]))
        if src.metric:
            settings.setdefault("metric", src.metric)
    unknown = set(settings) - set(FIELDS)
    if unknown:
        raise BadConfig(f"{source}: unknown key '{sorted(unknown)[0]}'")
    try:
        return RunConfig(**settings)
    except BadConfig as e:
        if source != "config":
            raise BadConfig(f"{source}: {e}") from None
        raise
