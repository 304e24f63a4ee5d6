"""Typed configuration of an engine, with its defaults and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from captioning.captioner import DecodeOptions
from retrieval.factory import DEFAULT_ENCODER

DEFAULT_CAPTIONER: str | None = "native:effl0-sat-v4"  # "none" in PIXQUERY_CAPTIONER or --captioner switches it off
# The caption decoder that rates query text against images (the ``likelihood`` signal of fused
# ranking). It is a native captioner trained with cross-entropy, whatever writes the captions.
DEFAULT_SCORER: str | None = "native:effl0-sat-v1"
# The match head that reads the scorer's memories (the ``match`` signal); trained on that scorer's
# memories, so it is used only beside it.
DEFAULT_MATCHER: str | None = "native:effl0-match-v1"

ENV_DB = "PIXQUERY_DB"  # index folder
ENV_ENCODER = "PIXQUERY_ENCODER"
ENV_DEVICE = "PIXQUERY_DEVICE"
ENV_CACHE = "PIXQUERY_CACHE_DIR"  # model and feature caches
ENV_CAPTIONER = "PIXQUERY_CAPTIONER"  # "none" switches captions off
ENV_SCORER = "PIXQUERY_SCORER"  # "none" switches the likelihood signal off
ENV_MATCHER = "PIXQUERY_MATCHER"  # "none" switches the match signal off


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
    device: str = field(default_factory=lambda: os.environ.get(ENV_DEVICE, "auto"))
    cache_dir: Path = field(default_factory=default_cache_dir)
    offline: bool = False  # never fetch model weights (open_clip / Hugging Face)
    captioner: str | None = field(default_factory=lambda: _model_from_env(ENV_CAPTIONER, DEFAULT_CAPTIONER))  # None: no captions
    scorer: str | None = field(default_factory=lambda: _model_from_env(ENV_SCORER, DEFAULT_SCORER))  # None: off
    matcher: str | None = field(default_factory=lambda: _model_from_env(ENV_MATCHER, DEFAULT_MATCHER))  # None: off
    pool: int = 100  # fused ranking: candidates taken from each of the image, caption and keyword searches
    rerank_depth: int = 10  # fused ranking: the best candidates the scorer and the match head re-rate
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    batch_size: int = 32
    workers: int = 2  # decode threads
    progress: bool = True

    def __post_init__(self) -> None:
        self.index_dir = Path(self.index_dir).expanduser()
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.encoder is None and os.environ.get(ENV_ENCODER):
            self.encoder = os.environ[ENV_ENCODER]

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def db_path(self) -> Path:
        return self.index_dir / "pixquery.sqlite"

    @property
    def vectors_path(self) -> Path:
        """Image embeddings."""
        return self.index_dir / "images.faiss"

    @property
    def caption_vectors_path(self) -> Path:
        """Embeddings of the generated captions."""
        return self.index_dir / "captions.faiss"

    @property
    def memory_path(self) -> Path:
        """The scorer's per-image decoder memories (8-bit)."""
        return self.index_dir / "memories.faiss"

    @property
    def index_files(self) -> tuple[Path, ...]:
        """Every file an index consists of (``drop`` deletes exactly these)."""
        db = self.db_path
        return (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                self.vectors_path, self.caption_vectors_path, self.memory_path)

    @property
    def default_encoder(self) -> str:
        return DEFAULT_ENCODER
