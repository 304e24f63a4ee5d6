"""Commands for the people who measure and train pixquery: ``eval``, ``bench`` and ``train``.

Nothing at runtime imports these; they call the evaluation and benchmark room (``indexer/lab/``) and
the training rooms of the model packages (``retrieval/native/training/``, ``captioning/training/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from indexer.cli.scale import bases_from, register_bench as register_ann_bench, vector_source
from indexer.cli.teams_lab import register_bench, register_eval
from indexer.cli.args import EXIT_OK, captioning, common, config_from, weights, weights_from
from retrieval.query import MODES
from retrieval.shipped import DEFAULTS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``bench`` and ``train`` to ``pixquery``'s sub-command parser."""
    _eval_parsers(sub)
    _bench_parsers(sub)
    _train_parsers(sub)


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
def _train_parsers(sub: argparse._SubParsersAction) -> None:
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
    common(t)
    t.set_defaults(handler=train_encoder)
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
    s.add_argument("--init", metavar="PATH", help=f"start weights for --scst (default: the shipped cross-entropy captioner {DEFAULTS['scorer']})")
    s.add_argument("--samples", type=int, default=5, help="captions sampled per image (default 5)")
    s.add_argument("--images-per-batch", type=int, default=32, help="images per SCST step (default 32)")
    s.add_argument("--eval-every", type=int, default=0,
                   help="dev evaluation every N steps as well as after each epoch (default 0: epochs only)")
    s.add_argument("--train-dropout", action="store_true", help="keep dropout on in the SCST loss pass")
    s.add_argument("--bleu-weight", type=float, default=0.0,
                   help="reward = CIDEr-D + this x sentence BLEU-4 (default 0: CIDEr-D only)")
    s.add_argument("--max-minutes", type=float, help="time budget: stop after it, evaluate, keep the best state")
    common(t)
    t.set_defaults(handler=train_captioner)
    t = tsub.add_parser("average", help="average the weights of native captioners of one lineage into one decoder",
                        description="Average the parameters of native captioners that share an architecture and "
                                    "vocabulary (for example a self-critical model and the cross-entropy model it "
                                    "was fine-tuned from): one decoder, decoded at the speed of one.")
    t.add_argument("spec", help="captioners joined by '+', each a shipped name or a path with an optional @weight, "
                                "e.g. 'runs/scst3/effl0-sat-v3.pt@0.5+effl0-sat-v1@0.5' (weights are normalised to sum 1)")
    t.add_argument("--out", required=True, help="where to write the averaged weights")
    t.add_argument("--data", help="Flickr8k folder: score the average on its dev split and record the scores")
    t.add_argument("--beam", type=int, default=3, help="beam for the dev scores (default 3, the captioner's default)")
    common(t)
    t.set_defaults(handler=train_average)
    t = tsub.add_parser("matcher", help="train the match head that re-rates fused results (Flickr8k train split)",
                        description="Train the match head: a small cross-attention model that rates how well a "
                                    "query fits an image from the query's MiniLM token states and the scorer's "
                                    "stored memory of the image, taught to pick each train caption's own image "
                                    "among the images the joint encoder confuses it with.")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/matcher/matcher.pt", help="where to write the weights")
    t.add_argument("--scorer", default=DEFAULTS["scorer"],
                   help=f"native captioner whose memories the head reads (default {DEFAULTS['scorer']}, the default scorer)")
    t.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=int, default=24, help="train captions per step (default 24)")
    t.add_argument("--negatives", type=int, default=7, help="other images per caption in a step (default 7)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    common(t)
    t.set_defaults(handler=train_matcher)
    t = tsub.add_parser("tagger", help="calibrate the ImageNet tagger on Flickr8k train (temperature, tag thresholds)",
                        description="Calibrate the tags that the image tower's ImageNet classifier gives: the softmax "
                                    "temperature and the thresholds of class and group tags, judged against the "
                                    "words of Flickr8k train's captions; also embeds the class names for the "
                                    "zero-shot ranking signal. Reports precision on train and dev.")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/tagger/tagger.pt", help="where to write the tagger file")
    t.add_argument("--class-precision", type=float, default=0.75, help="target precision of class tags on train")
    t.add_argument("--group-precision", type=float, default=0.95, help="target precision of group tags on train")
    common(t)
    t.set_defaults(handler=train_tagger)
    t = tsub.add_parser("confidence", help="fit the caption confidence on Flickr8k train only (dev is only reported on)",
                        description="Caption Flickr8k train and dev with the captioner, measure each caption against "
                                    "its image (joint-encoder agreement, the captioner's likelihood, agreement with "
                                    "the tags), and fit a logistic regression on train that predicts whether the "
                                    "caption scores well (CIDEr-D) against the human captions.")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/confidence/confidence.pt", help="where to write the model")
    t.add_argument("--captioner", default=DEFAULTS["captioner"], help="the captioner whose captions are rated")
    t.add_argument("--good-cider", type=float, default=0.5, help="CIDEr-D from which a caption counts as good")
    common(t)
    t.set_defaults(handler=train_confidence)


def _training_setup(args: argparse.Namespace) -> tuple[Path, str]:
    """(feature cache folder, device) for a training command; training uses every core."""
    import torch

    from indexer.config import default_cache_dir
    from retrieval.device import resolve_device

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return cache / "features", str(resolve_device(args.device or "auto"))


def train_average(args: argparse.Namespace) -> int:
    from captioning.training.average import write_average

    features, _ = _training_setup(args)
    meta = write_average(args.spec, Path(args.out), Path(args.data) if args.data else None, features, args.beam)
    members = ", ".join(f"{m['captioner']} @ {m['weight']:.3g}" for m in meta["averaged"])
    print(f"wrote {args.out} (average of {members}); log: {Path(args.out).with_suffix('.json')}")
    if "dev" in meta:
        print(f"dev {meta['dev']}")
    return EXIT_OK


def train_matcher(args: argparse.Namespace) -> int:
    from captioning.native import load_members
    from retrieval.errors import InputError
    from retrieval.native.training.matcher import ScorerMemories, TrainMatcherConfig, train_matcher as run

    features, _ = _training_setup(args)
    members = load_members(args.scorer.removeprefix("native:"))
    if len(members) != 1:
        raise InputError(f"the match head reads one scorer's memories; {args.scorer!r} names {len(members)}")
    scorer = members[0]
    mcfg = TrainMatcherConfig(data=Path(args.data), out=Path(args.out), cache_dir=features, steps=args.steps,
                              batch_size=args.batch_size, negatives=args.negatives, lr=args.lr, seed=args.seed,
                              progress=not args.quiet)
    meta = run(mcfg, ScorerMemories(scorer.name, scorer.sha256, scorer.decoder.encode))
    print(f"wrote {mcfg.out} ({meta['minutes']} min); log: {mcfg.out.with_suffix('.json')}")
    print(f"dev {meta['dev']}")
    return EXIT_OK


def train_tagger(args: argparse.Namespace) -> int:
    from retrieval.native.training.tagger import TrainTaggerConfig, train_tagger as run

    features, device = _training_setup(args)
    meta = run(TrainTaggerConfig(data=Path(args.data), out=Path(args.out), cache_dir=features, device=device,
                                 class_precision=args.class_precision, group_precision=args.group_precision))
    print(f"wrote {args.out} (temperature {meta['calibration']['temperature']}, class tags from "
          f"{meta['calibration']['class_threshold']}, group tags from {meta['calibration']['group_threshold']}); "
          f"log: {Path(args.out).with_suffix('.json')}")
    print(json.dumps(meta["precision_by_caption_words"]))
    return EXIT_OK


def train_confidence(args: argparse.Namespace) -> int:
    from captioning.training.confidence import TrainConfidenceConfig, train_confidence as run

    features, device = _training_setup(args)
    meta = run(TrainConfidenceConfig(data=Path(args.data), out=Path(args.out), cache_dir=features, device=device,
                                     captioner=args.captioner, good_cider=args.good_cider,
                                     progress=not args.quiet))
    print(f"wrote {args.out} (threshold {meta['threshold']}); log: {Path(args.out).with_suffix('.json')}")
    print(json.dumps({k: v["full"] for k, v in meta["report"].items()}))
    return EXIT_OK


def train_captioner(args: argparse.Namespace) -> int:
    features, device = _training_setup(args)
    if args.scst:
        from captioning.training.scst import ScstConfig, train_scst

        cfg = ScstConfig(
            data=Path(args.data), out=Path(args.out), cache_dir=features,
            init=Path(args.init) if args.init else None, device=device,
            epochs=args.epochs if args.epochs is not None else 5, lr=args.lr if args.lr is not None else 5e-5,
            n_samples=args.samples, images_per_batch=args.images_per_batch, eval_every=args.eval_every,
            train_dropout=args.train_dropout, max_minutes=args.max_minutes, flip_augment=args.flip, seed=args.seed,
            bleu_weight=args.bleu_weight, progress=not args.quiet)
        meta = train_scst(cfg)
    else:
        from captioning.training.captioner import TrainCaptionerConfig, train_captioner as run

        if args.init:
            from retrieval.errors import InputError

            raise InputError("--init only applies to --scst (cross-entropy training starts from scratch)")
        cfg = TrainCaptionerConfig(
            data=Path(args.data), out=Path(args.out), cache_dir=features, device=device,
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff, dropout=args.dropout,
            epochs=args.epochs if args.epochs is not None else 12, batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else 4e-4, flip_augment=args.flip, seed=args.seed,
            progress=not args.quiet)
        meta = run(cfg)
    print(f"wrote {cfg.out} ({meta['model_choice']}, {meta['seconds']} s); log: {cfg.out.with_suffix('.json')}")
    print(f"dev {meta['dev']}")
    return EXIT_OK


def train_encoder(args: argparse.Namespace) -> int:
    from retrieval.native.training.encoder import TrainEncoderConfig, train_encoder as run

    features, device = _training_setup(args)
    cfg = TrainEncoderConfig(data=Path(args.data), out=Path(args.out), cache_dir=features,
                             device=device, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             embed_dim=args.embed_dim, members=args.members, flip_augment=args.flip, seed=args.seed,
                             progress=not args.quiet)
    meta = run(cfg)
    dev = meta["dev"]
    print(f"wrote {cfg.out} ({meta['model_choice']}, {meta['seconds']} s); log: {cfg.out.with_suffix('.json')}")
    print(f"dev text->image {dev['text_to_image']}  image->text {dev['image_to_text']}")
    return EXIT_OK
