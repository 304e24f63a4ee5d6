"""Everyday commands: index, search, similar, duplicates, stats, caption, recaption, demo, ui.

Each command is a parser (``_<command>_parser``) and a handler (``cmd_<command>``) that calls the
:class:`~indexer.engine.Engine` and prints; errors travel as typed exceptions to :func:`indexer.cli.main`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from indexer.cli.args import (
    EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, captioning, common, config_from, filters, filters_from, wait, weights,
    weights_from,
)
from retrieval.query import MODES

# The app is started by module name, never imported: nothing at runtime imports ui/ (tests/test_architecture.py
# checks that this constant is the only way in).
APP_MODULE = "ui.app"


def app_path() -> Path | None:
    """Where the app's entry point is installed (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(APP_MODULE)
    except ModuleNotFoundError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def register(sub: argparse._SubParsersAction) -> None:
    """Add the everyday commands to ``pixquery``'s sub-command parser."""
    p = sub.add_parser("index", help="index a folder of images (incremental)")
    p.add_argument("folder", help="folder to index, recursively")
    p.add_argument("--rebuild", action="store_true", help="drop this index and embed everything again")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 256 on a GPU, 32 on a CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding threads or processes (default 2 on a CPU, most cores beside a GPU)")
    p.add_argument("--readers", choices=("auto", "threads", "processes"), default="auto",
                   help="decode on threads or on worker processes (default auto: processes beside a GPU)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="read and embed on a Ray cluster (pip install 'pixquery[ray]'): HOST:PORT, ray://HOST:PORT, "
                        "auto, or nothing for $RAY_ADDRESS or the Ray on this machine (started if none); the photos must be at "
                        "the same paths on every node")
    p.add_argument("--ray-actors", type=int, metavar="N", help="model actors on the cluster (default: one per GPU, "
                                                                "else one per CPU)")
    wait(p)
    common(p)
    captioning(p)
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("recaption", help="caption every indexed image again (after a captioner change)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 256 on a GPU, 32 on a CPU)")
    wait(p)
    common(p)
    captioning(p)
    p.set_defaults(handler=cmd_recaption)

    p = sub.add_parser("caption", help="print a caption for each image (no index needed)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 256 on a GPU, 32 on a CPU)")
    common(p)
    captioning(p)
    p.set_defaults(handler=cmd_caption)

    p = sub.add_parser("search", help="search the index with words or an example image")
    p.add_argument("query", nargs="?", help='what to look for, e.g. "dog on a park bench"')
    p.add_argument("--image", metavar="PATH", help="search by example image (combined with the text if both)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--mode", default="fused", choices=MODES,
                   help="ranking: image embeddings, caption embeddings, caption keywords (BM25), or all "
                        "fused (default)")
    weights(p)
    p.add_argument("--threshold", type=float, help="leave out results scoring below this")
    p.add_argument("--explain", action="store_true",
                   help="say why each result matched: caption words, what each signal added, filters")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    filters(p)
    common(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("similar", help="images most like an indexed image (more like this)")
    p.add_argument("image", metavar="IMAGE_OR_ID", help="an indexed image: its path, or its id (see --json output)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    filters(p)
    common(p)
    p.set_defaults(handler=cmd_similar)

    p = sub.add_parser("duplicates", help="groups of exact copies (same bytes) and near copies (similar images)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="image similarity (cosine, in (0, 1]) from which two images count as near copies "
                        "(default 0.95)")
    p.add_argument("--json", action="store_true", help="print the groups and counts as JSON")
    common(p)
    p.set_defaults(handler=cmd_duplicates)

    p = sub.add_parser("stats", help="what is in the index")
    p.add_argument("--skipped", action="store_true", help="also list skipped files with reasons")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(handler=cmd_stats)

    p = sub.add_parser("demo", help="index the bundled sample photos and run example searches (offline)")
    p.add_argument("queries", nargs="*", help="queries to run (default: a few examples)")
    p.add_argument("-k", type=int, default=3)
    common(p)
    p.set_defaults(handler=cmd_demo)

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
    common(p)
    p.set_defaults(handler=cmd_ui)


def _print_summary(s, out=None) -> None:
    out = out or sys.stdout  # looked up now: a default argument would keep the stream of import time
    print(f"indexed {s.root}: {s.files_seen} image files, {s.total_images} in the index", file=out)
    print(f"  new {s.new}, changed {s.changed}, moved {s.moved}, copies {s.copied}, unchanged {s.unchanged}, "
          f"touched {s.touched}, deleted {s.deleted}, skipped {s.skipped}", file=out)
    if s.skipped_reasons:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped_reasons.items()))
        print(f"  skipped files by reason: {why} (list them with: pixquery stats --skipped)", file=out)
    if s.captioned:
        print(f"  captioned {s.captioned} images", file=out)
    if s.tagged:
        print(f"  tagged {s.tagged} images (the others had no confident class)", file=out)
    if s.embedded:
        print(f"  embedded {s.embedded} images in {s.seconds:.1f} s ({s.images_per_second:.1f} images/s)", file=out)
    if getattr(s, "ray_address", None) and s.sent_to_ray + s.from_shards:
        print(f"  on Ray ({s.ray_address}, {s.actors} actors): {s.sent_to_ray} files read by the workers, "
              f"{s.from_shards} taken from the shards of a stopped run", file=out)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.cli.interrupts import stop_on_interrupt
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine:
        if args.ray is not None:  # (Ctrl-C stops a Ray run at once; its last checkpoint stays)
            from indexer.indexing.distributed import RayOptions, index_on_ray

            options = RayOptions(address=args.ray, actors=args.ray_actors, verbose=args.verbose)
            summary = index_on_ray(engine, args.folder, options, rebuild=args.rebuild)
        else:
            with stop_on_interrupt() as stop:
                summary = engine.index(args.folder, rebuild=args.rebuild, stop=stop)
    if args.json:
        print(summary.to_json())
    else:
        _print_summary(summary)
    if summary.interrupted:
        print("pixquery: interrupted; what was indexed is kept: run the same command again to carry on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _tag_line(tags) -> str:
    return ", ".join(f"{t.name} {t.probability:.2f}" for t in tags)


def _print_hits(hits, out=None, reasons: dict[int, str] | None = None) -> None:
    """Rank, score and path of each hit; then its caption and tags. A caption rated uncertain comes after
    the tags and is marked so (the tags are what the photo surely shows)."""
    out = out or sys.stdout
    if not hits:
        print("no results", file=out)
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h.score:.4f}  {h.path}", file=out)
        uncertain = h.caption and h.caption_is_confident is False
        if h.caption and not uncertain:
            print(f"           {h.caption}", file=out)
        if h.tags:
            print(f"           tags: {_tag_line(h.tags)}", file=out)
        if uncertain:
            print(f"           (uncertain caption, confidence {h.caption_confidence:.2f}) {h.caption}", file=out)
        if reasons and reasons.get(h.id):
            print(f"           why: {reasons[h.id]}", file=out)


def cmd_search(args: argparse.Namespace) -> int:
    from indexer.engine import Engine
    from indexer.errors import InputError

    if args.query is None and args.image is None:
        raise InputError('give a query ("dog on a park bench") or --image PATH')
    weights, filters = weights_from(args), filters_from(args)
    with Engine(config_from(args)) as engine:
        hits = engine.search(args.query, image=args.image, k=args.k, mode=args.mode, weights=weights,
                             filters=filters, threshold=args.threshold)
        untagged = engine.untagged()
        reasons = ({e.id: e.text for e in engine.explain(hits, args.query, args.mode, filters)}
                   if args.explain else {})
    if untagged and not args.json:
        print(f"pixquery: note: {untagged} images of this index have no tags yet, so ranking does not use them "
              f"for those; add them with: pixquery retag", file=sys.stderr)
    if args.json:
        results = [h.to_dict() | ({"explanation": reasons[h.id]} if h.id in reasons else {}) for h in hits]
        print(json.dumps({"query": args.query, "image": args.image, "mode": args.mode, "k": args.k,
                          "weights": weights.to_dict(), "filters": filters.describe(), "results": results}))
    else:
        _print_hits(hits, reasons=reasons)
    return EXIT_OK


def cmd_similar(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    filters = filters_from(args)
    target: int | str = args.image
    if args.image.strip().isascii() and args.image.strip().isdigit() and not Path(args.image).exists():
        target = int(args.image)
    with Engine(config_from(args)) as engine:
        hits = engine.more_like_this(target, k=args.k, filters=filters)
    if args.json:
        print(json.dumps({"image": args.image, "k": args.k, "results": [h.to_dict() for h in hits]}))
    else:
        _print_hits(hits)
    return EXIT_OK


def cmd_duplicates(args: argparse.Namespace) -> int:
    from indexer.search.duplicates import summarize
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine:
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
    from indexer.cli.interrupts import stop_on_interrupt
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine, stop_on_interrupt() as stop:
        counts = engine.recaption(stop=stop)
    done = f" ({counts['already_done']} already done by an interrupted run)" if counts["already_done"] else ""
    print(f"captioned {counts['captioned']} of {counts['images']} images{done} ({counts['tagged']} given tags); "
          f"{counts['failed']} could not be read")
    if counts["interrupted"]:
        print("pixquery: interrupted; the new captions so far are kept: run the same command again to carry on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_caption(args: argparse.Namespace) -> int:
    from indexer.engine import Engine
    from retrieval.errors import ImageDecodeError, InputError
    from retrieval.images import load_image

    config = config_from(args)
    if not config.captioner:
        raise InputError("no captioner configured: pass --captioner NAME")
    engine = Engine(config)
    captioner, batch = engine.captioner, engine.batch_size
    results, failed = [], 0
    for start in range(0, len(args.images), batch):
        chunk, images = [], []
        for path in args.images[start:start + batch]:
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

    with Engine(config_from(args)) as engine:
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
    tags, conf = stats["tags"], stats["caption_confidence"]
    if tags["tagger"]:
        print(f"tags: {tags['tagged']} images tagged by {tags['tagger']['name']}"
              + (f"; {tags['untagged']} not yet (add them with: pixquery retag)" if tags["untagged"] else ""))
    else:
        print("tags: none (an index from before tags; add them with: pixquery retag)")
    if conf["model"]:
        print(f"caption confidence: {conf['confident']} of {conf['rated']} rated captions confident "
              f"(from {conf['model']['threshold']:.2f})" + (f"; {conf['unrated']} not rated (pixquery retag)"
                                                         if conf["unrated"] else ""))
    elif stats["captioned"]:
        print("caption confidence: not rated (rate the captions with: pixquery retag)")
    for line in vector_lines(stats.get("vector_index") or {}):
        print(line)
    if stats["last_run"]:
        lr = stats["last_run"]
        print(f"last run {lr['started_at']} on {lr['root']}")
    for item in stats.get("skipped_files", []):
        print(f"  skipped {item['path']}: {item['reason']}")
    return EXIT_OK


def vector_lines(vi: dict) -> list[str]:
    """``pixquery stats``'s lines about the vector search structures (see Engine.stats)."""
    out = []
    for kind in ("images", "captions"):
        d = vi.get(kind)
        if not d:
            continue
        if d["kind"] == "flat":
            out.append(f"{kind[:-1]} vectors: exact search (flat), {d['stored_rows']} stored rows")
            continue
        recall = d.get("recall_at_10")
        out.append(f"{kind[:-1]} vectors: approximate, {d['factory']} over {d['approximate_vectors']} vectors "
                   f"({d['file_mb']} MB), nprobe {d['nprobe']}, short list {d['refine']} x k re-ranked exactly; "
                   + (f"recall@10 {recall} against exact on {d['recall_queries']} queries when trained at "
                      f"{d['trained_at_n']} vectors" if recall is not None else "recall not measured"))
    return out


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def ui_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and the environment that ``pixquery ui`` starts the app with."""
    app = app_path()
    if app is None:
        from retrieval.errors import PixqueryError

        raise PixqueryError(f"the app ({APP_MODULE}) is missing from this installation")
    if not 0 < args.port < 65536:
        from retrieval.errors import InputError

        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    env = dict(os.environ)
    for flag, var in (("db", "PIXQUERY_DB"), ("cache_dir", "PIXQUERY_CACHE_DIR"), ("encoder", "PIXQUERY_ENCODER"),
                      ("device", "PIXQUERY_DEVICE"), ("db_url", "PIXQUERY_DB_URL")):
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
    config = config_from(args)
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
