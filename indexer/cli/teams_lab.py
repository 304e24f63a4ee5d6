"""The teams' lab commands, registered into ``eval`` and ``bench`` by ``lab.py``: ``eval feedback``,
``bench api`` and ``bench import``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.cli.args import EXIT_OK, captioning, common, config_from, weights, weights_from


def register_eval(esub: argparse._SubParsersAction) -> None:
    e = esub.add_parser("feedback", help="recall after one round of relevance feedback by a simulated user",
                        description="Rank each caption query (fused), let a simulated user mark the first --shown "
                                    "results, rank again with the feedback, and compare recall (see "
                                    "indexer/lab/feedback.py for the users and the caveat).")
    e.add_argument("--images", required=True, help="folder holding the images")
    e.add_argument("--captions", required=True, help="file of 'file_name<TAB>caption' lines")
    e.add_argument("--shown", type=int, default=24, help="results the user looks at (default 24, the app's page)")
    e.add_argument("--users", default="good,good+bad", help="simulated users (default good,good+bad)")
    e.add_argument("--limit", type=int, help="only this many queries, spread over the set")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    weights(e)
    common(e)
    captioning(e)
    e.set_defaults(handler=eval_feedback)


def eval_feedback(args: argparse.Namespace) -> int:
    from indexer.lab.feedback import evaluate_feedback

    users = tuple(u.strip() for u in args.users.split(",") if u.strip())
    report = evaluate_feedback(Path(args.images), Path(args.captions), config_from(args), shown=args.shown,
                               users=users, limit=args.limit, weights=weights_from(args))
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(f"{report['n_images']} images, {report['n_queries']} queries; right image among the first "
          f"{report['shown']} for {report['shown_queries']}")

    def line(name: str, r: dict | None) -> None:
        if r:
            print(f"  {name:28s} R@1 {r['R@1']:5.1f}  R@5 {r['R@5']:5.1f}  R@10 {r['R@10']:5.1f}  medr {r['medr']:g}")

    line("no feedback", report["none"])
    for user in users:
        line(f"one round, user '{user}'", report[user]["all"])
        line("   right image not shown", report[user]["not_shown"])
    line("no feedback, not shown", report["none_not_shown"])
    return EXIT_OK


def register_bench(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("api", help="warm latency of POST /api/search under concurrent clients, synthetic index")
    b.add_argument("--images", type=int, default=100_000, help="synthetic images when --db does not exist yet")
    b.add_argument("--clients", default="1,8", help="concurrency levels (default 1,8)")
    b.add_argument("--rounds", type=int, default=5, help="times each client sends the 20 queries (default 5)")
    common(b)
    b.set_defaults(handler=bench_api)
    b = bsub.add_parser("import", help="time meta import of an N-row catalogue CSV into the synthetic index")
    b.add_argument("--images", type=int, default=100_000, help="rows (and synthetic images when --db is new)")
    b.add_argument("--scratch", default=None, help="folder for the generated CSV (default: --db/../bench-import)")
    common(b)
    b.set_defaults(handler=bench_import)


def _own_db(args: argparse.Namespace, what: str) -> None:
    if not args.db:
        from retrieval.errors import InputError

        raise InputError(f"bench {what} builds a synthetic index: give it its own --db folder")


def bench_api(args: argparse.Namespace) -> int:
    from indexer.lab.bench_api import bench_api as run

    _own_db(args, "api")
    config = config_from(args)
    levels = tuple(int(c) for c in args.clients.split(",") if c.strip())
    print(json.dumps(run(config.index_dir, args.images, config, levels, args.rounds)))
    return EXIT_OK


def bench_import(args: argparse.Namespace) -> int:
    from indexer.lab.bench_api import bench_import as run

    _own_db(args, "import")
    config = config_from(args)
    scratch = Path(args.scratch) if args.scratch else config.index_dir.parent / "bench-import"
    print(json.dumps(run(config.index_dir, args.images, config, scratch)))
    return EXIT_OK
