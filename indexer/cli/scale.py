"""Commands about scale: ``pixquery bench ann`` (the vector search pixquery would build for N vectors).

Registered under ``bench`` by ``indexer/cli/lab.py`` (:func:`register_bench`). Heavy libraries are
imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import os

from indexer.cli.args import EXIT_OK, common, config_from

FLICKR8K_ENV = "PIXQUERY_FLICKR8K"  # default --data


def register_bench(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser(
        "ann", help="build the vector index pixquery would choose for N vectors and time it: build time, "
                    "memory, p50/p99 latency at k=10, recall@10 against exact search")
    b.add_argument("--n", type=int, required=True, help="number of vectors")
    b.add_argument("--dim", type=int, help="vector dimension (default: the native encoder's, 1024)")
    vector_source(b)
    b.add_argument("--queries", type=int, default=500, help="timed queries (real caption embeddings; default 500)")
    b.add_argument("--index-type", choices=("auto", "flat", "ivf"), default="auto",
                   help="auto (default): what pixquery chooses for N; flat: exact; ivf: approximate")
    b.add_argument("--memory-mb", type=int, help="memory budget of the search structure (default 1024)")
    b.add_argument("--threads", type=int, help="FAISS threads (default: FAISS's own, one per core)")
    b.add_argument("--workdir", metavar="DIR", help="where the N vectors are written meanwhile (default: temp)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    common(b)
    b.set_defaults(handler=bench_ann)


def vector_source(b: argparse.ArgumentParser) -> None:
    """Where a benchmark's synthetic vectors come from (read back with :func:`bases_from`)."""
    b.add_argument("--data", metavar="DIR", default=os.environ.get(FLICKR8K_ENV),
                   help="Flickr8k folder whose native embeddings the synthetic vectors are made from, perturbed "
                        f"and mixed (images/, captions.tsv, train.txt, dev.txt; default ${FLICKR8K_ENV}); "
                        "computed once, then cached")
    b.add_argument("--gaussian", action="store_true",
                   help="random Gaussian vectors instead of real embeddings (no data needed; the worst case for "
                        "approximate search, unlike real collections)")


def bases_from(args: argparse.Namespace, config, what: str):  # noqa: ANN001, ANN201 - EngineConfig -> Bases | None
    """The real embeddings of ``--data`` (None with ``--gaussian``); neither is an error."""
    from pathlib import Path

    from retrieval.errors import InputError

    if args.gaussian:
        return None
    if not args.data:
        raise InputError(f"bench {what} makes its vectors from real embeddings: give --data FLICKR8K_DIR "
                         f"(or ${FLICKR8K_ENV}), or --gaussian for random ones")
    from indexer.engine import Engine
    from indexer.lab.real_vectors import flickr8k_bases

    return flickr8k_bases(Path(args.data), Engine(config))


def bench_ann(args: argparse.Namespace) -> int:
    from pathlib import Path

    from indexer.lab.bench_ann import bench_ann as run
    from indexer.storage.ann import AnnPolicy
    from retrieval.errors import InputError

    if args.n < 1 or (args.dim is not None and args.dim < 2) or args.queries < 1:
        raise InputError("--n and --queries must be at least 1, --dim at least 2")
    config = config_from(args)
    policy = AnnPolicy(index_type=args.index_type,
                       **({"memory_mb": args.memory_mb} if args.memory_mb else {}))
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    bases = bases_from(args, config, "ann")
    if bases is None:
        from indexer.lab.real_vectors import gaussian_bases

        bases = gaussian_bases(args.dim or 1024, n_images=7000)
    report = run(args.n, bases, args.dim, policy, args.queries, Path(args.workdir) if args.workdir else None)
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    idx, mem = report["index"], report["memory_mb"]
    kind = idx["kind"] if idx["kind"] == "flat" else (f"{idx['factory']} (nprobe {idx['nprobe']}, "
                                                        f"short list {idx['refine']} x k re-ranked exactly)")
    print(f"{report['n']} vectors of {report['dim']} ({report['vectors']}): {kind}")
    print(f"  build {report['build_seconds']} s, open {report['open_seconds']} s")
    print(f"  k=10: p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms over {report['queries']} queries; "
          f"recall@10 {report['recall_at_10']} against exact search")
    print(f"  memory: structure ~{mem['structure_estimate']} MB, file {mem['index_file']} MB, resident "
          f"{mem['rss_after_queries'].get('VmRSS')} MB after the queries (peak {mem['peak_rss']} MB)")
    return EXIT_OK
