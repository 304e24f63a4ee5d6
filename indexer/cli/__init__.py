"""``pixquery``: the command line. Parses arguments, calls the Engine, prints results.

Split by audience: everyday commands (``everyday.py``: index, search, similar, duplicates, stats,
caption, recaption, demo, ui), the teams' commands (``teams.py``: serve, meta, export) and the commands
that measure and train (``lab.py``: eval, bench, train).
Only this package (and the app) turns :class:`PixqueryError` into messages and exit codes. Heavy
libraries (torch, faiss, transformers) are imported inside the commands, never at start-up.

Exit codes: 0 success; 1 runtime error (a file error the commands did not foresee included: its message,
never a traceback); 2 bad usage or input (missing folder, empty query,
unreadable query image); 3 no index here, or the index was built with another encoder;
4 a model could not be loaded; 5 another process is writing the index (``--wait`` waits for it);
130 interrupted (Ctrl-C: an indexing run stops after the batch in flight and keeps what it did).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from indexer.cli import everyday, lab, maintenance, tags, teams
from indexer.cli.args import EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixquery", description="Index a photo folder and search it in plain words.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    everyday.register(sub)
    maintenance.register(sub)
    teams.register(sub)
    lab.register(sub)
    tags.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from retrieval.errors import PixqueryError

    try:
        return args.handler(args)
    except PixqueryError as exc:
        print(f"pixquery: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pixquery: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file or folder the library did not expect to fail (full disk, permissions...)
        logging.getLogger("pixquery").info("file error", exc_info=True)  # the traceback, with --verbose
        print(f"pixquery: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
