"""Flags that several commands share, and what they turn into (a config, weights, filters).

Heavy libraries are imported inside the readers, never at start-up (``pixquery --help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrieval.query import SIGNALS
from retrieval.shipped import DEFAULTS, names

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INDEX, EXIT_MODEL, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="DIR", help="index folder (default: $PIXQUERY_DB or ~/.local/share/pixquery/index)")
    p.add_argument("--db-url", metavar="URL",
                   help="metadata database as an SQLAlchemy URL, e.g. postgresql+psycopg://user@host/photos "
                        "(default: $PIXQUERY_DB_URL, else SQLite in the index folder; vectors stay in the folder)")
    p.add_argument("--encoder", help=f"joint encoder, e.g. {DEFAULTS['encoder']} or openclip:ViT-B-32/laion2b_s34b_b79k "
                                     f"(default: the index's own; {DEFAULTS['encoder']} for a new index)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--cache-dir", help="model cache folder (default: $PIXQUERY_CACHE_DIR or ~/.cache/pixquery)")
    p.add_argument("--offline", action="store_true", help="never download model weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")


def wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="if another pixquery process is writing this index, wait for it to finish "
                        "(default: stop with a message, exit code 5)")


def captioning(p: argparse.ArgumentParser) -> None:
    shipped = ", ".join(f"native:{n}" for n in names("captioner"))
    p.add_argument("--captioner", help=f"captioner: {shipped}, hf:Salesforce/blip-image-captioning-base, "
                                       "openclip:coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k, or none "
                                       f"(default: $PIXQUERY_CAPTIONER or {DEFAULTS['captioner']})")
    p.add_argument("--beam", type=int, default=3, help="beam size for captions (1 = greedy; default 3)")
    p.add_argument("--max-words", type=int, default=20, help="longest caption in words (default 20)")
    tagging(p)


def tagging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tagger", help=f"tags and the zero-shot 'tags' signal: native:<tagger file> or none "
                                    f"(default: $PIXQUERY_TAGGER or {DEFAULTS['tagger']})")
    p.add_argument("--confidence", help=f"caption confidence: native:<confidence file> or none "
                                        f"(default: $PIXQUERY_CONFIDENCE or {DEFAULTS['confidence']})")


def weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="SPEC",
                   help=f"fused-mode weights, e.g. image=1,caption=0.3,keyword=0 (names: {', '.join(SIGNALS)}; "
                        f"unnamed ones keep their defaults)")


def weights_from(args: argparse.Namespace):  # noqa: ANN201 - retrieval.query.FusionWeights
    """:class:`retrieval.query.FusionWeights` from ``--weights``; bad specs raise ``InputError`` (exit 2)."""
    from retrieval.query import FusionWeights

    return FusionWeights.parse(getattr(args, "weights", None) or "")


def filters(p: argparse.ArgumentParser) -> None:
    """Flags that restrict a search to part of the collection (read back with :func:`filters_from`)."""
    g = p.add_argument_group("filters (applied inside the search: k results whenever k images match)")
    g.add_argument("--folder", metavar="DIR", help="only images under this folder")
    g.add_argument("--glob", metavar="PATTERN", help="only paths matching this shell pattern, e.g. '*/2023-*/*.jpg'")
    g.add_argument("--after", metavar="YYYY-MM-DD", help="taken (EXIF date, else file date) on or after this day")
    g.add_argument("--before", metavar="YYYY-MM-DD", help="taken on or before this day")
    g.add_argument("--type", dest="file_types", metavar="EXT", action="append", default=[],
                   help="file type, e.g. jpg (repeat, or a comma list: --type jpg,png)")
    g.add_argument("--min-width", type=int, default=0, metavar="N", help="at least N pixels wide")
    g.add_argument("--min-height", type=int, default=0, metavar="N", help="at least N pixels high")
    g.add_argument("--where", action="append", default=[], metavar="COND",
                   help="a condition on an imported catalogue field (pixquery meta import), e.g. category=shoes, "
                        "price<50, released>=2024-01-01, title~linen (contains), brand=acme|zeta (any of); "
                        "repeat: all must hold")


def filters_from(args: argparse.Namespace):  # noqa: ANN201 - indexer.storage.filters.Filters
    """The :class:`indexer.storage.filters.Filters` of the :func:`filters` flags; bad values raise ``InputError``."""
    from datetime import datetime

    from indexer.storage.filters import Filters
    from retrieval.errors import InputError

    def day(flag: str, value: str | None):
        if value is None:
            return None
        try:
            return datetime.strptime(value.strip(), "%Y-%m-%d").date()
        except ValueError:
            raise InputError(f"--{flag} wants a date as YYYY-MM-DD, got {value!r}") from None

    types = tuple(t.strip() for item in args.file_types for t in item.split(",") if t.strip())
    return Filters(folder=args.folder, glob=args.glob, after=day("after", args.after), before=day("before", args.before),
                   file_types=types, min_width=args.min_width, min_height=args.min_height,
                   where=tuple(getattr(args, "where", None) or ()))


def config_from(args: argparse.Namespace):  # noqa: ANN201 - indexer.config.EngineConfig
    """The :class:`indexer.config.EngineConfig` of the :func:`common` (and :func:`captioning`) flags."""
    from indexer.config import EngineConfig

    kwargs = {"encoder": args.encoder, "offline": args.offline, "progress": not args.quiet and sys.stderr.isatty()}
    if args.db:
        kwargs["index_dir"] = Path(args.db)
    if getattr(args, "db_url", None):
        kwargs["db_url"] = args.db_url
    if args.device:
        kwargs["device"] = args.device
    if args.cache_dir:
        kwargs["cache_dir"] = Path(args.cache_dir)
    if getattr(args, "wait", False):
        kwargs["wait_for_lock"] = True
    for name in ("batch_size", "workers", "readers"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "captioner", None) is not None:
        kwargs["captioner"] = None if args.captioner.strip().lower() in ("", "none", "off") else args.captioner
    for name in ("tagger", "confidence"):
        if getattr(args, name, None) is not None:
            value = getattr(args, name).strip()
            kwargs[name] = None if value.lower() in ("", "none", "off") else value
    if getattr(args, "beam", None) is not None:
        from captioning.captioner import DecodeOptions

        kwargs["decode"] = DecodeOptions(beam_size=args.beam, max_len=args.max_words)
    return EngineConfig(**kwargs)
