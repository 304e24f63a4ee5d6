"""Typed configuration of an engine, with its defaults and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from captioning.captioner import DecodeOptions
from indexer.indexing.reader import READERS
from indexer.storage.store import sqlite_path
from indexer.storage.ann import AnnPolicy
from indexer.storage.vectors import INDEX_TYPES
from retrieval.errors import InputError
from retrieval.shipped import DEFAULTS

# The defaults come from the registry of shipped weights (retrieval/shipped.py): the captioner writes
# the captions ("none" in PIXQUERY_CAPTIONER or --captioner switches it off); the scorer is the caption
# decoder that rates query text against images (the ``likelihood`` signal of fused ranking), a native
# captioner trained with cross-entropy whatever writes the captions; the match head reads the scorer's
# memories (the ``match`` signal), so it is used only beside the scorer it was trained on.

ENV_DB = "PIXQUERY_DB"  # index folder
ENV_DB_URL = "PIXQUERY_DB_URL"  # the metadata database, when it is not the index folder's SQLite file
ENV_ENCODER = "PIXQUERY_ENCODER"
ENV_DEVICE = "PIXQUERY_DEVICE"
ENV_CACHE = "PIXQUERY_CACHE_DIR"  # model and feature caches
ENV_CAPTIONER = "PIXQUERY_CAPTIONER"  # "none" switches captions off
ENV_SCORER = "PIXQUERY_SCORER"  # "none" switches the likelihood signal off
ENV_RATER = "PIXQUERY_RATER"  # unset or "none": the scorer rates texts itself
ENV_MATCHER = "PIXQUERY_MATCHER"  # "none" switches the match signal off
ENV_TAGGER = "PIXQUERY_TAGGER"  # "none": no tags for new images, and no tags signal
ENV_CONFIDENCE = "PIXQUERY_CONFIDENCE"  # "none": captions are not rated
ENV_CHECKPOINT_EVERY = "PIXQUERY_CHECKPOINT_EVERY"  # rows between indexing checkpoints


def _int_from_env(var: str, default: int) -> int:
    raw = os.environ.get(var, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise InputError(f"{var} must be a whole number, got {raw!r}") from None


def default_index_dir() -> Path:
    """``$PIXQUERY_DB``, else ``$XDG_DATA_HOME/pixquery/index``, else ``~/.local/share/pixquery/index``."""
    if os.environ.get(ENV_DB):
        return Path(os.environ[ENV_DB]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pixquery" / "index"


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pixquery"


def _model_from_env(var: str, default: str | None) -> str | None:
    value = os.environ.get(var, default or "")
    return None if value.strip().lower() in ("", "none", "off") else value.strip()


@dataclass
class EngineConfig:
    index_dir: Path = field(default_factory=default_index_dir)
    encoder: str | None = None  # None: the index's own encoder, or the default for a new index
    # any SQLAlchemy URL for the metadata (None: SQLite in index_dir); the vector files stay in index_dir
    db_url: str | None = field(default_factory=lambda: os.environ.get(ENV_DB_URL) or None)
    # the vector search structure: "auto" (exact for small collections, approximate IVF above
    # ann.flat_max vectors), "flat" (always exact) or "ivf" (always approximate); indexer/storage/ann.py
    index_type: str = "auto"
    ann: AnnPolicy = field(default_factory=AnnPolicy)  # when and how (thresholds, memory budget, recall target)
    device: str = field(default_factory=lambda: os.environ.get(ENV_DEVICE, "auto"))
    cache_dir: Path = field(default_factory=default_cache_dir)
    offline: bool = False  # never fetch model weights (open_clip / Hugging Face)
    captioner: str | None = field(default_factory=lambda: _model_from_env(ENV_CAPTIONER, DEFAULTS["captioner"]))  # None: no captions
    scorer: str | None = field(default_factory=lambda: _model_from_env(ENV_SCORER, DEFAULTS["scorer"]))  # None: off
    # a shallower decoder distilled from the scorer that rates query text from the scorer's memories, faster
    # but less exact (pixquery train rater; shipped: native:effl0-sat-v1-rater1); None: the scorer itself
    rater: str | None = field(default_factory=lambda: _model_from_env(ENV_RATER, None))
    matcher: str | None = field(default_factory=lambda: _model_from_env(ENV_MATCHER, DEFAULTS["matcher"]))  # None: off
    # tags from the native image tower's ImageNet classifier (the ``tags`` signal reads them), and the
    # model that rates each caption (captioning/confidence.py); None: off
    tagger: str | None = field(default_factory=lambda: _model_from_env(ENV_TAGGER, DEFAULTS["tagger"]))
    confidence: str | None = field(default_factory=lambda: _model_from_env(ENV_CONFIDENCE, DEFAULTS["confidence"]))
    pool: int = 100  # fused ranking: candidates taken from each of the image, caption and keyword searches
    rerank_depth: int = 10  # fused ranking: the best candidates the scorer and the match head re-rate
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    batch_size: int | None = None  # images per model batch (None: 256 on a GPU, 32 on a CPU; Engine.batch_size)
    workers: int | None = None  # decoding threads or processes (None: 2 on a CPU, most cores beside a GPU)
    readers: str = "auto"  # threads, processes (decoding worker processes) or auto: processes beside a GPU
    # rows written between checkpoints of an indexing or recaption run: what a crash or kill can lose at most
    checkpoint_every: int = field(default_factory=lambda: _int_from_env(ENV_CHECKPOINT_EVERY, 1024))
    wait_for_lock: bool | float = False  # another process writing the index: False fail, True wait, N seconds
    progress: bool = True

    def __post_init__(self) -> None:
        self.index_dir = Path(self.index_dir).expanduser()
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.encoder is None and os.environ.get(ENV_ENCODER):
            self.encoder = os.environ[ENV_ENCODER]
        if self.index_type not in INDEX_TYPES:
            raise InputError(f"unknown vector index type {self.index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")
        if (self.batch_size is not None and self.batch_size < 1) or (self.workers is not None and self.workers < 1) \
                or self.checkpoint_every < 1:
            raise InputError("the batch size, the number of reader threads and the checkpoint interval must be "
                             "at least 1")
        if self.readers not in READERS:
            raise InputError(f"unknown readers {self.readers!r}; choose one of: {', '.join(READERS)}")

    @property
    def ann_policy(self) -> AnnPolicy:
        """``ann`` with this configuration's ``index_type``."""
        return replace(self.ann, index_type=self.index_type)

    @property
    def url(self) -> str:
        """The metadata database's SQLAlchemy URL."""
        return self.db_url or f"sqlite:///{self.index_dir / 'pixquery.sqlite'}"

    @property
    def db_file(self) -> Path | None:
        """The metadata database's file (None when it is a server's)."""
        return sqlite_path(self.url)

    @property
    def vectors_dir(self) -> Path:
        """The vector segments and their manifests (indexer/storage/bundle.py)."""
        return self.index_dir / "vectors"

    @property
    def default_encoder(self) -> str:
        return DEFAULTS["encoder"]

    def batch_size_for(self, device) -> int:  # noqa: ANN001 - torch.device
        """Images per model batch: the configured size, else 256 on a GPU and 32 on a CPU."""
        if self.batch_size is not None:
            return self.batch_size
        from retrieval.device import default_batch_size

        return default_batch_size(device)

    def workers_for(self, device) -> int:  # noqa: ANN001 - torch.device
        """Decoding threads or processes: the configured number, else 2 on a CPU (the model needs the
        cores) and all cores but two beside a GPU (at most 16)."""
        if self.workers is not None:
            return self.workers
        return max(2, min(16, (os.cpu_count() or 2) - 2)) if device.type == "cuda" else 2

    def processes_for(self, device) -> bool:  # noqa: ANN001 - torch.device
        """Whether indexing decodes on worker processes (``readers``; auto: beside a GPU) rather than threads."""
        if self.readers != "auto":
            return self.readers == "processes"
        return device.type == "cuda"
