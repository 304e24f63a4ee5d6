"""Commands for the people who measure and train pixquery: ``eval``, ``bench`` and ``train`` (the last in
``training.py``).

Nothing at runtime imports these; they call the evaluation and benchmark room (``indexer/lab/``) and
the training rooms of the model packages (``retrieval/native/training/``, ``captioning/training/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.cli.training import register as register_train
from indexer.cli.scale import bases_from, register_bench as register_ann_bench, vector_source
from indexer.cli.teams_lab import register_bench, register_eval
from indexer.cli.args import EXIT_OK, captioning, common, config_from, weights, weights_from
from retrieval.query import MODES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``bench`` and ``train`` to ``pixquery``'s sub-command parser."""
    _eval_parsers(sub)
    _bench_parsers(sub)
    register_train(sub)


# --- eval ---------------------------------------------------------------------------------------------
def _eval_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure quality on a captioned image set")
    esub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    e = esub.add_parser("retrieval", help="text->image and image->text recall on a fresh temporary index",
                        description="Recall of every ranking mode on a fresh temporary index, for caption queries "
                                    "(--captions: each caption finds its own image, e.g. Flickr8k dev) or for a "
                                    "query set (--queries: queries as users type them with all their relevant "
                                    "images, over every image of --images; 'ood' is the shipped out-of-domain set "
                                    "over the sample photos).")
    e.add_argument("--images", help="folder holding the images (default for --queries ood: the sample photos)")
    q = e.add_mutually_exclusive_group(required=True)
    q.add_argument("--captions", help="file of 'file_name<TAB>caption' lines")
    q.add_argument("--queries", help="file of 'query<TAB>relevant file names[<TAB>split]' lines, or 'ood'")
    e.add_argument("--baseline", action="store_true",
                   help="also report fused ranking as before tags (mode fused_before_tags), in the same run")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--modes", default=",".join(MODES), help="comma list of ranking modes to report")
    e.add_argument("--tune", action="store_true", help="also grid-search the fused weights on these queries")
    weights(e)
    common(e)
    captioning(e)
    e.set_defaults(handler=eval_retrieval)
    e = esub.add_parser("captions", help="BLEU, CIDEr and ROUGE-L of generated captions against references")
    e.add_argument("--images", required=True, help="folder holding the images")
    e.add_argument("--captions", required=True, help="file of 'file_name<TAB>caption' reference lines")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--batch-size", type=int, default=32)
    common(e)
    captioning(e)
    e.set_defaults(handler=eval_captions)
    register_eval(esub)


def eval_captions(args: argparse.Namespace) -> int:
    from indexer.lab.evaluate import evaluate_captions

    report = evaluate_captions(Path(args.images), Path(args.captions), config_from(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['n_images']} images, captioner {report['captioner']}")
        print("  ".join(f"{k} {v:.4f}" for k, v in report.items() if k not in ("n_images", "captioner")))
    return EXIT_OK


def eval_retrieval(args: argparse.Namespace) -> int:
    from indexer.lab.evaluate import evaluate_retrieval

    from indexer.lab.queries import named_set
    from retrieval.errors import InputError

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    queries, images = (Path(args.queries) if args.queries else None), args.images
    shipped = named_set(args.queries) if args.queries else None
    if shipped is not None:
        queries, images = shipped[0], images or shipped[1]
    if images is None:
        raise InputError("--images FOLDER is needed (except with --queries ood)")
    report = evaluate_retrieval(Path(images), Path(args.captions) if args.captions else None, config_from(args),
                                modes=modes, weights=weights_from(args), tune=args.tune, queries_file=queries,
                                baseline=args.baseline)
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(f"{report['n_images']} images, {report['n_queries']} queries, encoder {report['encoder']}, "
          f"captioner {report['captioner']}, tagger {report['tagger']}, weights {report['weights']}")
    parts = [("", report["text_to_image"])] + [(f" {sp}", r) for sp, r in report.get("by_split", {}).items()]
    for where, rows in parts:
        for mode, r in rows.items():
            print(f"text->image{where} [{mode}]  R@1 {r['R@1']:.1f}  R@5 {r['R@5']:.1f}  R@10 {r['R@10']:.1f}  "
                  f"medr {r['medr']:g}")
    r = report["image_to_text"]
    if r is not None:
        print(f"image->text            R@1 {r['R@1']:.1f}  R@5 {r['R@5']:.1f}  R@10 {r['R@10']:.1f}")
    if "tuning" in report:
        print(f"tuned weights: {report['tuning'].get('best', report['tuning']['best_first_stage'])}")
    return EXIT_OK


# --- bench --------------------------------------------------------------------------------------------
def _bench_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time indexing and searching (numbers for docs/BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, text, handler in (("index", "index N images of FOLDER into a fresh temporary index", bench_index),
                                ("caption", "caption N images of FOLDER (decode + backbone + beam search)",
                                 bench_caption)):
        b = bsub.add_parser(what, help=text)
        b.add_argument("folder")
        b.add_argument("--limit", type=int, default=1000)
        b.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 32 on a CPU")
        b.add_argument("--workers", type=int, default=None,
                       help="decoding threads or processes (default 2 on a CPU, most cores beside a GPU)")
        if what == "index":
            b.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                           help="index on a Ray cluster, as pixquery index --ray (default address: a local Ray)")
            b.add_argument("--ray-actors", type=int, metavar="N", help="model actors (default: one per GPU or CPU)")
            b.add_argument("--readers", choices=("auto", "threads", "processes"), default="auto",
                           help="decode on threads or worker processes (default auto: processes beside a GPU)")
            b.add_argument("--naive", type=int, default=100, metavar="N",
                           help="also time a naive one-image-at-a-time loop on the first N images (0: no)")
            b.add_argument("--large", metavar="DIR",
                           help="benchmark 4000x3000 JPEG copies of the images instead, written into DIR "
                                "(kept there for the next run): the 12-megapixel test set; a --limit beyond "
                                "the folder's images adds mirrored and flipped variants, not copies")
        common(b)
        captioning(b)
        b.set_defaults(handler=handler)
    b = bsub.add_parser("search", help="time cold 'pixquery search' processes against an index")
    b.add_argument("query", nargs="?", default="a dog running on the grass")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--baseline", metavar="CMD",
                   help="also time this command line (e.g. \"rclip -n 10 'a dog'\"), alternating with pixquery")
    common(b)
    b.set_defaults(handler=bench_search)
    b = bsub.add_parser("latency", help="warm per-query latency of every ranking mode on a synthetic index")
    b.add_argument("--images", type=int, default=100_000, help="synthetic images when --db does not exist yet")
    b.add_argument("--passes", type=int, default=5, help="times each of the 20 benchmark queries runs per mode")
    b.add_argument("--modes", default=",".join(MODES))
    vector_source(b)
    common(b)
    b.set_defaults(handler=bench_latency)
    b = bsub.add_parser("checkpoints", help="time indexing checkpoints while a synthetic index grows to N images")
    b.add_argument("--images", type=int, default=100_000, help="synthetic images to write (default 100000)")
    b.add_argument("--every", type=int, default=1024, help="images per checkpoint (default 1024, as indexing)")
    common(b)
    b.set_defaults(handler=bench_checkpoints)
    b = bsub.add_parser("ui", help="time the app in a headless browser: first page load, and search to a "
                                   "rendered page of 24 results, on a synthetic index of N images")
    b.add_argument("--images", type=int, default=10_000,
                   help="size of the synthetic index (the sample photos, hard-linked; default 10000)")
    b.add_argument("--use-db", action="store_true", help="time the index at --db instead of a synthetic one")
    b.add_argument("--runs", type=int, default=10, help="searches per pass (default 10)")
    b.add_argument("--query", action="append", default=[],
                   help="search this (repeat for several; default: ten example queries)")
    b.add_argument("-k", type=int, default=24, help="results per page (default 24, the app's default)")
    b.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of a result page here")
    common(b)
    captioning(b)
    b.set_defaults(handler=bench_ui)
    register_bench(bsub)
    register_ann_bench(bsub)


def bench_index(args: argparse.Namespace) -> int:
    from indexer.lab.bench_index import bench_index as run

    ray = None
    if args.ray is not None:
        from indexer.indexing.distributed import RayOptions

        ray = RayOptions(address=args.ray, actors=args.ray_actors, verbose=args.verbose)
    print(json.dumps(run(Path(args.folder), args.limit, config_from(args), ray=ray, naive=args.naive,
                         large=Path(args.large) if args.large else None)))
    return EXIT_OK


def bench_caption(args: argparse.Namespace) -> int:
    from indexer.lab.bench import bench_caption as run

    print(json.dumps(run(Path(args.folder), args.limit, config_from(args))))
    return EXIT_OK


def bench_search(args: argparse.Namespace) -> int:
    from indexer.lab.bench import bench_search as run

    print(json.dumps(run(config_from(args).index_dir, args.query, args.runs, baseline=args.baseline)))
    return EXIT_OK


def _own_db(args: argparse.Namespace, what: str) -> None:
    if not args.db:
        from retrieval.errors import InputError

        raise InputError(f"bench {what} builds a synthetic index: give it its own --db folder")


def bench_latency(args: argparse.Namespace) -> int:
    from indexer.lab.bench_latency import bench_latency as run

    _own_db(args, "latency")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    config = config_from(args)
    bases = bases_from(args, config, "latency")
    log = None if args.quiet else (lambda line: print(f"building: {line}", file=sys.stderr, flush=True))
    print(json.dumps(run(config.index_dir, args.images, config, args.passes, modes, bases, log)))
    return EXIT_OK


def bench_checkpoints(args: argparse.Namespace) -> int:
    from indexer.lab.bench_checkpoints import bench_checkpoints as run

    _own_db(args, "checkpoints")
    print(json.dumps(run(config_from(args), args.images, args.every)))
    return EXIT_OK


def bench_ui(args: argparse.Namespace) -> int:
    from indexer.lab.bench_ui import bench_ui as run

    config = config_from(args)
    report = run(config, args.images, args.runs, index_dir=config.index_dir if args.use_db else None,
                 screenshot=Path(args.screenshot) if args.screenshot else None,
                 queries=tuple(args.query) or None, k=args.k)
    print(json.dumps(report))
    return EXIT_OK


# --- train --------------------------------------------------------------------------------------------
