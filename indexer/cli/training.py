"""``pixquery train ...``: the commands that train pixquery's native models on Flickr8k's train split.

They call the training rooms of the model packages (``retrieval/native/training/``,
``captioning/training/``); nothing at runtime imports them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from indexer.cli.args import EXIT_OK, common
from retrieval.shipped import DEFAULTS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``pixquery``'s sub-command parser."""
    _train_parsers(sub)


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
    t = tsub.add_parser("rater", help="distil a faster rater of query text from the scorer (Flickr8k train split)",
                        description="Distil a rater: a decoder with fewer layers than the scorer that reads the "
                                    "scorer's own stored memories (so indexes and the match head stay valid) and "
                                    "rates how likely a query is for an image, taught by the train captions and by "
                                    "the scorer's next-word distributions. Fused ranking then uses it for the "
                                    "likelihood signal (PIXQUERY_RATER; 'none': the scorer itself).")
    t.add_argument("--data", required=True, help="Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)")
    t.add_argument("--out", default="runs/rater/rater.pt", help="where to write the weights")
    t.add_argument("--scorer", default=DEFAULTS["scorer"],
                   help=f"the native captioner to distil, whose memories the rater reads (default {DEFAULTS['scorer']})")
    t.add_argument("--layers", type=int, default=1, help="decoder layers kept, the scorer's first ones (default 1)")
    t.add_argument("--epochs", type=int, default=4, help="default 4")
    t.add_argument("--distill", type=float, default=0.5,
                   help="weight of the scorer's next-word distributions against the train captions (default 0.5)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    common(t)
    t.set_defaults(handler=train_rater)
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


def _one_decoder(spec: str, why: str):  # noqa: ANN202 - captioning.native.Member
    """The single native decoder ``spec`` names (InputError, saying ``why``, for an ensemble)."""
    from captioning.native import load_members
    from retrieval.errors import InputError

    members = load_members(spec.removeprefix("native:"))
    if len(members) != 1:
        raise InputError(f"{why}; {spec!r} names {len(members)}")
    return members[0]


def train_matcher(args: argparse.Namespace) -> int:
    from retrieval.native.training.matcher import ScorerMemories, TrainMatcherConfig, train_matcher as run

    features, _ = _training_setup(args)
    scorer = _one_decoder(args.scorer, "the match head reads one scorer's memories")
    mcfg = TrainMatcherConfig(data=Path(args.data), out=Path(args.out), cache_dir=features, steps=args.steps,
                              batch_size=args.batch_size, negatives=args.negatives, lr=args.lr, seed=args.seed,
                              progress=not args.quiet)
    meta = run(mcfg, ScorerMemories(scorer.name, scorer.sha256, scorer.decoder.encode))
    print(f"wrote {mcfg.out} ({meta['minutes']} min); log: {mcfg.out.with_suffix('.json')}")
    print(f"dev {meta['dev']}")
    return EXIT_OK


def train_rater(args: argparse.Namespace) -> int:
    from captioning.training.rater import TrainRaterConfig, train_rater as run

    features, _ = _training_setup(args)
    scorer = _one_decoder(args.scorer, "a rater is distilled from one decoder")
    cfg = TrainRaterConfig(data=Path(args.data), out=Path(args.out), cache_dir=features, layers=args.layers,
                           epochs=args.epochs, distill=args.distill, lr=args.lr, seed=args.seed,
                           progress=not args.quiet)
    meta = run(cfg, scorer.decoder, scorer.tokenizer, f"native:{scorer.name}", scorer.sha256)
    print(f"wrote {cfg.out} ({meta['model_choice']}, {meta['minutes']} min); log: {cfg.out.with_suffix('.json')}")
    print(f"dev {json.dumps(meta['dev'])}")
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
