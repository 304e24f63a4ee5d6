"""``pixquery``: the command line. Parses arguments, calls the Engine, prints results.

Only this module (and the app) turns :class:`PixqueryError` into messages and exit codes.
Heavy libraries (torch, faiss, transformers) are imported inside the commands, never at start-up.

Exit codes: 0 success; 1 runtime error; 2 bad usage or input (missing folder, empty query,
unreadable query image); 3 no index here, or the index was built with another encoder;
4 a model could not be loaded; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INDEX, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="DIR", help="index folder (default: $PIXQUERY_DB or ~/.local/share/pixquery/index)")
    p.add_argument("--encoder", help="joint encoder, e.g. native:effl0-minilm-v1 or openclip:ViT-B-32/laion2b_s34b_b79k "
                                     "(default: the index's own; native:effl0-minilm-v1 for a new index)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--cache-dir", help="model cache folder (default: $PIXQUERY_CACHE_DIR or ~/.cache/pixquery)")
    p.add_argument("--offline", action="store_true", help="never download model weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")


def _captioning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captioner", help="captioner, e.g. native:effl0-sat-v1, hf:Salesforce/blip-image-captioning-base, "
                                       "openclip:coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k, or none "
                                       "(default: $PIXQUERY_CAPTIONER or the shipped native captioner)")
    p.add_argument("--beam", type=int, default=3, help="beam size for captions (1 = greedy; default 3)")
    p.add_argument("--max-words", type=int, default=20, help="longest caption in words (default 20)")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="SPEC",
                   help="fused-mode weights, e.g. image=1,caption=0.3,keyword=0,likelihood=2,match=0 (unnamed ones "
                        "keep their defaults)")


def _weights_from(args: argparse.Namespace):
    """:class:`indexer.query.FusionWeights` from ``--weights``; bad specs raise ``InputError`` (exit 2)."""
    from dataclasses import replace

    from indexer.errors import InputError
    from indexer.query import FusionWeights

    if not getattr(args, "weights", None):
        return FusionWeights()
    values = {}
    for part in args.weights.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in FusionWeights().to_dict():
            raise InputError(f"--weights: expected NAME=NUMBER with NAME one of image, caption, keyword, "
                             f"likelihood, match; got {part!r}")
        try:
            values[name] = float(value)
        except ValueError:
            raise InputError(f"--weights: {value!r} is not a number") from None
    return replace(FusionWeights(), **values)


def _filters(p: argparse.ArgumentParser) -> None:
    """Flags that restrict a search to part of the collection (read back with :func:`_filters_from`)."""
    g = p.add_argument_group("filters (applied inside the search: k results whenever k images match)")
    g.add_argument("--folder", metavar="DIR", help="only images under this folder")
    g.add_argument("--glob", metavar="PATTERN", help="only paths matching this shell pattern, e.g. '*/2023-*/*.jpg'")
    g.add_argument("--after", metavar="YYYY-MM-DD", help="taken (EXIF date, else file date) on or after this day")
    g.add_argument("--before", metavar="YYYY-MM-DD", help="taken on or before this day")
    g.add_argument("--type", dest="file_types", metavar="EXT", action="append", default=[],
                   help="file type, e.g. jpg (repeat, or a comma list: --type jpg,png)")
    g.add_argument("--min-width", type=int, default=0, metavar="N", help="at least N pixels wide")
    g.add_argument("--min-height", type=int, default=0, metavar="N", help="at least N pixels high")


def _filters_from(args: argparse.Namespace):
    """The :class:`indexer.query.Filters` of the ``_filters`` flags; bad values raise ``InputError`` (exit 2)."""
    from datetime import datetime

    from indexer.query import Filters
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
                   file_types=types, min_width=args.min_width, min_height=args.min_height)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixquery", description="Index a photo folder and search it in plain words.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("index", help="index a folder of images (incremental)")
    p.add_argument("folder", help="folder to index, recursively")
    p.add_argument("--rebuild", action="store_true", help="drop this index and embed everything again")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _common(p)
    _captioning(p)

    p = sub.add_parser("recaption", help="caption every indexed image again (after a captioner change)")
    p.add_argument("--batch-size", type=int, default=32)
    _common(p)
    _captioning(p)

    p = sub.add_parser("caption", help="print a caption for each image (no index needed)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    _common(p)
    _captioning(p)

    p = sub.add_parser("search", help="search the index with words or an example image")
    p.add_argument("query", nargs="?", help='what to look for, e.g. "dog on a park bench"')
    p.add_argument("--image", metavar="PATH", help="search by example image (combined with the text if both)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--mode", default="fused", choices=("image", "caption", "keyword", "fused"),
                   help="ranking: image embeddings, caption embeddings, caption keywords (BM25), or all "
                        "fused (default)")
    _weights(p)
    p.add_argument("--threshold", type=float, help="leave out results scoring below this")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    _filters(p)
    _common(p)

    p = sub.add_parser("similar", help="images most like an indexed image (more like this)")
    p.add_argument("image", metavar="IMAGE_OR_ID", help="an indexed image: its path, or its id (see --json output)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    _filters(p)
    _common(p)

    p = sub.add_parser("duplicates", help="groups of exact copies (same bytes) and near copies (similar images)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="image similarity (cosine, in (0, 1]) from which two images count as near copies "
                        "(default 0.95)")
    p.add_argument("--json", action="store_true", help="print the groups and counts as JSON")
    _common(p)

    p = sub.add_parser("stats", help="what is in the index")
    p.add_argument("--skipped", action="store_true", help="also list skipped files with reasons")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("demo", help="index the bundled sample photos and run example searches (offline)")
    p.add_argument("queries", nargs="*", help="queries to run (default: a few examples)")
    p.add_argument("-k", type=int, default=3)
    _common(p)

    p = sub.add_parser("ui", help="open the search app in your browser (Streamlit, on this computer only by default)",
                       description="Start the pixquery app (Search and Collection pages) on http://HOST:PORT. "
                                   "By default only this computer can open it (127.0.0.1). --host 0.0.0.0 lets "
                                   "anyone on your network search your photos and see them, and index folders "
                                   "(add --read-only to forbid that): there is no login.")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this computer only; 0.0.0.0 exposes your photos, "
                        "with no login, to everyone on the network)")
    p.add_argument("--read-only", action="store_true", help="no indexing from the app (search and browse only)")
    _common(p)

    p = sub.add_parser("eval", help="measure quality on a captioned image set")
    esub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    e = esub.add_parser("retrieval", help="text->image and image->text recall on a fresh temporary index")
    e.add_argument("--images", required=True, help="folder holding the images")
    e.add_argument("--captions", required=True, help="file of 'file_name<TAB>caption' lines")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--modes", default="image,caption,keyword,fused", help="comma list of ranking modes to report")
    e.add_argument("--tune", action="store_true", help="also grid-search the fused weights on these queries")
    _weights(e)
    _common(e)
    _captioning(e)
    e = esub.add_parser("captions", help="BLEU, CIDEr and ROUGE-L of generated captions against references")
    e.add_argument("--images", required=True, help="folder holding the images")
    e.add_argument("--captions", required=True, help="file of 'file_name<TAB>caption' reference lines")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--batch-size", type=int, default=32)
    _common(e)
    _captioning(e)

    p = sub.add_parser("bench", help="time indexing and searching (numbers for docs/BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, text in (("index", "index N images of FOLDER into a fresh temporary index"),
                       ("caption", "caption N images of FOLDER (decode + backbone + beam search)")):
        b = bsub.add_parser(what, help=text)
        b.add_argument("folder")
        b.add_argument("--limit", type=int, default=1000)
        b.add_argument("--batch-size", type=int, default=32)
        b.add_argument("--workers", type=int, default=2)
        _common(b)
        _captioning(b)
    b = bsub.add_parser("search", help="time cold 'pixquery search' processes against an index")
    b.add_argument("query", nargs="?", default="a dog running on the grass")
    b.add_argument("--runs", type=int, default=5)
    _common(b)
    b = bsub.add_parser("latency", help="warm per-query latency of every ranking mode on a synthetic index")
    b.add_argument("--images", type=int, default=100_000, help="synthetic images when --db does not exist yet")
    b.add_argument("--passes", type=int, default=5, help="times each of the 20 benchmark queries runs per mode")
    b.add_argument("--modes", default="image,caption,keyword,fused")
    _common(b)
    b = bsub.add_parser("ui", help="time the app in a headless browser: first page load, and search to a "
                                   "rendered page of 24 results, on a synthetic index of N images")
    b.add_argument("--images", type=int, default=10_000,
                   help="size of the synthetic index (the sample photos, hard-linked; default 10000)")
    b.add_argument("--use-db", action="store_true", help="time the index at --db instead of a synthetic one")
    b.add_argument("--runs", type=int, default=10, help="searches per pass (default 10)")
    b.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of a result page here")
    _common(b)
    _captioning(b)

    p = sub.add_parser("train", help="train pixquery's native models")
    tsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = tsub.add_parser("encoder", help="train the native encoder heads on Flickr8k (train split)")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/encoder/heads.pt", help="where to write the heads (default runs/encoder/heads.pt)")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--embed-dim", type=int, default=256, help="dimension of each ensemble member")
    t.add_argument("--members", type=int, default=4, help="ensemble size (default 4)")
    t.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip augmentation")
    t.add_argument("--seed", type=int, default=0)
    _common(t)
    t = tsub.add_parser("captioner", help="train the native attention-decoder captioner on Flickr8k (train split)")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/captioner/captioner.pt", help="where to write the weights")
    t.add_argument("--epochs", type=int, help="default 12 (5 with --scst)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, help="default 4e-4 (5e-5 with --scst)")
    t.add_argument("--d-model", type=int, default=384)
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--heads", type=int, default=6)
    t.add_argument("--d-ff", type=int, default=1536)
    t.add_argument("--dropout", type=float, default=0.3)
    t.add_argument("--flip", action="store_true", help="augment with horizontally flipped images")
    t.add_argument("--seed", type=int, default=0)
    s = t.add_argument_group("self-critical fine-tuning (--scst; --epochs and --lr then default to 5 and 5e-5)")
    s.add_argument("--scst", action="store_true",
                   help="fine-tune existing weights (--init) with self-critical sequence training on CIDEr-D "
                        "instead of training from scratch with cross-entropy")
    s.add_argument("--init", metavar="PATH", help="start weights for --scst (default: the shipped cross-entropy captioner effl0-sat-v1)")
    s.add_argument("--samples", type=int, default=5, help="captions sampled per image (default 5)")
    s.add_argument("--images-per-batch", type=int, default=32, help="images per SCST step (default 32)")
    s.add_argument("--eval-every", type=int, default=0,
                   help="dev evaluation every N steps as well as after each epoch (default 0: epochs only)")
    s.add_argument("--train-dropout", action="store_true", help="keep dropout on in the SCST loss pass")
    s.add_argument("--bleu-weight", type=float, default=0.0,
                   help="reward = CIDEr-D + this x sentence BLEU-4 (default 0: CIDEr-D only)")
    s.add_argument("--max-minutes", type=float, help="time budget: stop after it, evaluate, keep the best state")
    _common(t)
    t = tsub.add_parser("average", help="average the weights of native captioners of one lineage into one decoder",
                        description="Average the parameters of native captioners that share an architecture and "
                                    "vocabulary (for example a self-critical model and the cross-entropy model it "
                                    "was fine-tuned from): one decoder, decoded at the speed of one.")
    t.add_argument("spec", help="captioners joined by '+', each a shipped name or a path with an optional @weight, "
                                "e.g. 'effl0-sat-v3@0.5+effl0-sat-v1@0.5' (weights are normalised to sum 1)")
    t.add_argument("--out", required=True, help="where to write the averaged weights")
    t.add_argument("--data", help="Flickr8k folder: score the average on its dev split and record the scores")
    t.add_argument("--beam", type=int, default=3, help="beam for the dev scores (default 3, the captioner's default)")
    _common(t)
    t = tsub.add_parser("matcher", help="train the match head that re-rates fused results (Flickr8k train split)",
                        description="Train the match head: a small cross-attention model that rates how well a "
                                    "query fits an image from the query's MiniLM token states and the scorer's "
                                    "stored memory of the image, taught to pick each train caption's own image "
                                    "among the images the joint encoder confuses it with.")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/matcher/matcher.pt", help="where to write the weights")
    t.add_argument("--scorer", default="effl0-sat-v1",
                   help="native captioner whose memories the head reads (default effl0-sat-v1, the default scorer)")
    t.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=int, default=24, help="train captions per step (default 24)")
    t.add_argument("--negatives", type=int, default=7, help="other images per caption in a step (default 7)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    _common(t)
    return parser


def _config(args: argparse.Namespace):
    from indexer.config import EngineConfig

    kwargs = {"encoder": args.encoder, "offline": args.offline, "progress": not args.quiet and sys.stderr.isatty()}
    if args.db:
        kwargs["index_dir"] = Path(args.db)
    if args.device:
        kwargs["device"] = args.device
    if args.cache_dir:
        kwargs["cache_dir"] = Path(args.cache_dir)
    for name in ("batch_size", "workers"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "captioner", None) is not None:
        kwargs["captioner"] = None if args.captioner.strip().lower() in ("", "none", "off") else args.captioner
    if getattr(args, "beam", None) is not None:
        from captioning.captioner import DecodeOptions

        if args.beam < 1 or args.max_words < 1:
            from retrieval.errors import InputError

            raise InputError("--beam and --max-words must be at least 1")
        kwargs["decode"] = DecodeOptions(beam_size=args.beam, max_len=args.max_words)
    return EngineConfig(**kwargs)


def _print_summary(s, out=sys.stdout) -> None:
    print(f"indexed {s.root}: {s.files_seen} image files, {s.total_images} in the index", file=out)
    print(f"  new {s.new}, changed {s.changed}, moved {s.moved}, copies {s.copied}, unchanged {s.unchanged}, "
          f"touched {s.touched}, deleted {s.deleted}, skipped {s.skipped}", file=out)
    if s.skipped_reasons:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped_reasons.items()))
        print(f"  skipped files by reason: {why} (list them with: pixquery stats --skipped)", file=out)
    if s.captioned:
        print(f"  captioned {s.captioned} images", file=out)
    if s.embedded:
        print(f"  embedded {s.embedded} images in {s.seconds:.1f} s ({s.images_per_second:.1f} images/s)", file=out)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(_config(args)) as engine:
        summary = engine.index(args.folder, rebuild=args.rebuild)
    if args.json:
        print(summary.to_json())
    else:
        _print_summary(summary)
    return EXIT_OK


def _print_hits(hits, out=sys.stdout) -> None:
    if not hits:
        print("no results", file=out)
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h.score:.4f}  {h.path}", file=out)
        if h.caption:
            print(f"           {h.caption}", file=out)


def cmd_search(args: argparse.Namespace) -> int:
    from indexer.engine import Engine
    from indexer.errors import InputError

    if args.query is None and args.image is None:
        raise InputError('give a query ("dog on a park bench") or --image PATH')
    weights, filters = _weights_from(args), _filters_from(args)
    with Engine(_config(args)) as engine:
        hits = engine.search(args.query, image=args.image, k=args.k, mode=args.mode, weights=weights,
                             filters=filters, threshold=args.threshold)
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image, "mode": args.mode, "k": args.k,
                          "weights": weights.to_dict(), "results": [h.to_dict() for h in hits]}))
    else:
        _print_hits(hits)
    return EXIT_OK


def cmd_similar(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    filters = _filters_from(args)
    target: int | str = args.image
    if args.image.strip().isascii() and args.image.strip().isdigit() and not Path(args.image).exists():
        target = int(args.image)
    with Engine(_config(args)) as engine:
        hits = engine.more_like_this(target, k=args.k, filters=filters)
    if args.json:
        print(json.dumps({"image": args.image, "k": args.k, "results": [h.to_dict() for h in hits]}))
    else:
        _print_hits(hits)
    return EXIT_OK


def cmd_duplicates(args: argparse.Namespace) -> int:
    from indexer.duplicates import summarize
    from indexer.engine import Engine

    with Engine(_config(args)) as engine:
        groups = engine.duplicates(threshold=args.threshold)
    counts = summarize(groups)
    if args.json:
        print(json.dumps({"threshold": args.threshold, "summary": counts, "groups": [g.to_dict() for g in groups]}))
        return EXIT_OK
    for g in groups:
        print(f"{g.kind:5s}  {len(g.ids)} images  similarity {g.similarity:.4f}")
        for path in g.paths:
            print(f"       {path}")
    print(f"{counts['groups']} groups, {counts['images']} images ({counts['exact_groups']} exact groups of "
          f"{counts['exact_images']} images, {counts['near_groups']} near groups of {counts['near_images']} images); "
          f"{counts['redundant']} beyond one per group")
    return EXIT_OK


def cmd_recaption(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(_config(args)) as engine:
        counts = engine.recaption()
    print(f"captioned {counts['captioned']} of {counts['images']} images; {counts['failed']} could not be read")
    return EXIT_OK


def cmd_caption(args: argparse.Namespace) -> int:
    from captioning.captioner import create_captioner
    from retrieval.device import resolve_device
    from retrieval.errors import ImageDecodeError, InputError
    from retrieval.images import load_image

    config = _config(args)
    if not config.captioner:
        raise InputError("no captioner configured: pass --captioner NAME")
    captioner = create_captioner(config.captioner, device=resolve_device(config.device),
                                 cache_dir=config.cache_dir / "models", offline=config.offline)
    results, failed = [], 0
    for start in range(0, len(args.images), config.batch_size):
        chunk, images = [], []
        for path in args.images[start:start + config.batch_size]:
            try:
                images.append(load_image(Path(path)).image)
                chunk.append(path)
            except (ImageDecodeError, FileNotFoundError, IsADirectoryError) as exc:
                failed += 1
                results.append({"path": path, "caption": None, "error": str(exc)})
        for path, caption in zip(chunk, captioner.caption_images(images, config.decode) if images else []):
            results.append({"path": path, "caption": caption or None})
    order = {p: i for i, p in enumerate(args.images)}
    results.sort(key=lambda r: order[r["path"]])
    if args.json:
        print(json.dumps({"captioner": captioner.info.name, "results": results}))
    else:
        for r in results:
            print(f"{r['path']}\t{r['caption'] if r['caption'] else '(skipped: ' + r.get('error', 'no caption') + ')'}")
    return EXIT_USAGE if failed == len(args.images) else EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(_config(args)) as engine:
        stats = engine.stats()
        if args.skipped:
            stats["skipped_files"] = engine.skipped_files()
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    enc = stats["encoder"] or {}
    print(f"index {stats['index_dir']}: {stats['images']} images, {stats['skipped']} skipped files, "
          f"{stats['index_bytes'] / 1e6:.1f} MB")
    print(f"encoder {enc.get('name')} (dim {enc.get('dim')}, weights {str(enc.get('weights_sha256'))[:12]})")
    cap = stats["captioner"]
    print(f"captions: {stats['captioned']} images" + (f", by {cap['name']} (weights {cap['weights_sha256'][:12]})" if cap else ""))
    scorer = stats.get("scorer")
    print(f"likelihood scorer: {scorer['name']}" if scorer else "likelihood scorer: none (fused ranking without it)")
    if stats["last_run"]:
        lr = stats["last_run"]
        print(f"last run {lr['started_at']} on {lr['root']}")
    for item in stats.get("skipped_files", []):
        print(f"  skipped {item['path']}: {item['reason']}")
    return EXIT_OK


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def ui_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and the environment that ``pixquery ui`` starts the app with."""
    app = Path(__file__).resolve().parent.parent / "ui" / "app.py"  # located, not imported: nothing imports ui/
    if not app.is_file():
        from retrieval.errors import PixqueryError

        raise PixqueryError(f"the app is missing from this installation ({app})")
    if not 0 < args.port < 65536:
        from retrieval.errors import InputError

        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    env = dict(os.environ)
    for flag, var in (("db", "PIXQUERY_DB"), ("cache_dir", "PIXQUERY_CACHE_DIR"), ("encoder", "PIXQUERY_ENCODER"),
                      ("device", "PIXQUERY_DEVICE")):
        value = getattr(args, flag, None)
        if value:
            env[var] = str(Path(value).expanduser().resolve()) if flag in ("db", "cache_dir") else value
    if args.offline:
        env["PIXQUERY_OFFLINE"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
    if args.read_only:
        env["PIXQUERY_UI_READ_ONLY"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app),
           "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false",  # no telemetry: nothing leaves this computer
           "--server.maxUploadSize", "20",  # MB; the app checks uploads again (ui/security.py)
           "--server.fileWatcherType", "none", "--server.runOnSave", "false",
           "--client.showErrorDetails", "none", "--client.toolbarMode", "minimal",
           "--logger.level", "info" if args.verbose else "warning"]
    return cmd, env


def cmd_ui(args: argparse.Namespace) -> int:
    cmd, env = ui_command(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pixquery app: http://{'localhost' if args.host in ('127.0.0.1', '::1') else host}:{args.port}  "
          f"(index {env.get('PIXQUERY_DB') or 'default'}; stop with Ctrl+C)", file=sys.stderr)
    if args.host not in LOOPBACK_HOSTS:
        print(f"pixquery: warning: serving on {args.host}: anyone who can reach this address can search and see "
              f"your photos{'' if args.read_only else ' and index folders'}; there is no login", file=sys.stderr)
    sys.stderr.flush()
    if os.name == "posix":  # become the server: Ctrl+C and kill reach Streamlit itself, nothing is left behind
        os.execvpe(cmd[0], cmd, env)  # does not return
        return EXIT_OK
    import subprocess

    return subprocess.call(cmd, env=env)


DEMO_QUERIES = ("a dog", "a plate of food", "a city at night", "a person riding a bicycle")


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from indexer.engine import Engine

    photos = Path(str(resources.files("indexer") / "sample_photos"))
    config = _config(args)
    if not args.db:
        config.index_dir = config.cache_dir / "demo-index"
    print(f"indexing the {len(list(photos.glob('*.jpg')))} bundled sample photos in {photos}\n"
          f"(index: {config.index_dir}; attribution: {photos / 'ATTRIBUTION.md'})")
    with Engine(config) as engine:
        _print_summary(engine.index(photos))
        for query in args.queries or DEMO_QUERIES:
            print(f'\nsearch "{query}"')
            _print_hits(engine.search(query, k=args.k))
    print(f"\nsearch it yourself: pixquery search --db {config.index_dir} \"your words\"")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from indexer.evaluate import evaluate_captions, evaluate_retrieval

    if args.what == "captions":
        report = evaluate_captions(Path(args.images), Path(args.captions), _config(args))
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{report['n_images']} images, captioner {report['captioner']}")
            print("  ".join(f"{k} {v:.4f}" for k, v in report.items() if k not in ("n_images", "captioner")))
        return EXIT_OK
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    report = evaluate_retrieval(Path(args.images), Path(args.captions), _config(args), modes=modes,
                                weights=_weights_from(args), tune=args.tune)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['n_images']} images, {report['n_queries']} caption queries, encoder {report['encoder']}, "
              f"captioner {report['captioner']}, weights {report['weights']}")
        for mode, r in report["text_to_image"].items():
            print(f"text->image [{mode:7s}]  R@1 {r['R@1']:.1f}  R@5 {r['R@5']:.1f}  R@10 {r['R@10']:.1f}  "
                  f"medr {r['medr']:g}")
        r = report["image_to_text"]
        print(f"image->text            R@1 {r['R@1']:.1f}  R@5 {r['R@5']:.1f}  R@10 {r['R@10']:.1f}")
        if "tuning" in report:
            print(f"tuned weights: {report['tuning'].get('best', report['tuning']['best_first_stage'])}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from indexer import bench

    config = _config(args)
    if args.what == "index":
        report = bench.bench_index(Path(args.folder), args.limit, config)
    elif args.what == "caption":
        report = bench.bench_caption(Path(args.folder), args.limit, config)
    elif args.what == "ui":
        from indexer.bench_ui import bench_ui

        report = bench_ui(config, args.images, args.runs, index_dir=config.index_dir if args.use_db else None,
                          screenshot=Path(args.screenshot) if args.screenshot else None)
    elif args.what == "latency":
        from indexer.bench_latency import bench_latency

        if not args.db:
            from indexer.errors import InputError

            raise InputError("bench latency builds a synthetic index: give it its own --db folder")
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        report = bench_latency(config.index_dir, args.images, config, args.passes, modes)
    else:
        report = bench.bench_search(config.index_dir, args.query, args.runs)
    print(json.dumps(report))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from indexer.config import EngineConfig
    from retrieval.device import resolve_device

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else EngineConfig().cache_dir
    device = resolve_device(args.device or "auto")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.what == "average":
        from captioning.average import write_average

        meta = write_average(args.spec, Path(args.out), Path(args.data) if args.data else None,
                             cache / "features", args.beam)
        members = ", ".join(f"{m['captioner']} @ {m['weight']:.3g}" for m in meta["averaged"])
        print(f"wrote {args.out} (average of {members}); log: {Path(args.out).with_suffix('.json')}")
        if "dev" in meta:
            print(f"dev {meta['dev']}")
        return EXIT_OK
    if args.what == "matcher":
        from captioning.match_train import TrainMatcherConfig, train_matcher

        mcfg = TrainMatcherConfig(data=Path(args.data), out=Path(args.out), cache_dir=cache / "features",
                                  scorer=args.scorer.removeprefix("native:"), steps=args.steps,
                                  batch_size=args.batch_size, negatives=args.negatives, lr=args.lr, seed=args.seed,
                                  progress=not args.quiet)
        meta = train_matcher(mcfg)
        print(f"wrote {mcfg.out} ({meta['minutes']} min); log: {mcfg.out.with_suffix('.json')}")
        print(f"dev {meta['dev']}")
        return EXIT_OK
    if args.what == "captioner" and args.scst:
        from captioning.scst import ScstConfig, train_scst

        scfg = ScstConfig(
            data=Path(args.data), out=Path(args.out), cache_dir=cache / "features",
            init=Path(args.init) if args.init else None, device=str(device),
            epochs=args.epochs if args.epochs is not None else 5, lr=args.lr if args.lr is not None else 5e-5,
            n_samples=args.samples, images_per_batch=args.images_per_batch, eval_every=args.eval_every,
            train_dropout=args.train_dropout, max_minutes=args.max_minutes, flip_augment=args.flip, seed=args.seed,
            bleu_weight=args.bleu_weight, progress=not args.quiet)
        meta = train_scst(scfg)
        print(f"wrote {scfg.out} ({meta['model_choice']}, {meta['seconds']} s); log: {scfg.out.with_suffix('.json')}")
        print(f"dev {meta['dev']}")
        return EXIT_OK
    if args.what == "captioner":
        from captioning.train import TrainCaptionerConfig, train_captioner

        if args.init:
            from retrieval.errors import InputError

            raise InputError("--init only applies to --scst (cross-entropy training starts from scratch)")
        ccfg = TrainCaptionerConfig(
            data=Path(args.data), out=Path(args.out), cache_dir=cache / "features", device=str(device),
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff, dropout=args.dropout,
            epochs=args.epochs if args.epochs is not None else 12, batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else 4e-4, flip_augment=args.flip, seed=args.seed,
            progress=not args.quiet)
        meta = train_captioner(ccfg)
        print(f"wrote {ccfg.out} ({meta['model_choice']}, {meta['seconds']} s); log: {ccfg.out.with_suffix('.json')}")
        print(f"dev {meta['dev']}")
        return EXIT_OK
    from retrieval.native.train import TrainEncoderConfig, train_encoder

    cfg = TrainEncoderConfig(data=Path(args.data), out=Path(args.out), cache_dir=cache / "features",
                             device=str(device), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             embed_dim=args.embed_dim, members=args.members, flip_augment=args.flip, seed=args.seed,
                             progress=not args.quiet)
    meta = train_encoder(cfg)
    dev = meta["dev"]
    print(f"wrote {cfg.out} ({meta['model_choice']}, {meta['seconds']} s); log: {cfg.out.with_suffix('.json')}")
    print(f"dev text->image {dev['text_to_image']}  image->text {dev['image_to_text']}")
    return EXIT_OK


COMMANDS = {"index": cmd_index, "recaption": cmd_recaption, "caption": cmd_caption, "search": cmd_search, "similar": cmd_similar,
            "duplicates": cmd_duplicates, "stats": cmd_stats, "demo": cmd_demo,
            "eval": cmd_eval, "bench": cmd_bench, "train": cmd_train, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from retrieval.errors import PixqueryError

    try:
        return COMMANDS[args.command](args)
    except PixqueryError as exc:
        print(f"pixquery: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pixquery: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
