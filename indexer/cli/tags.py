"""``pixquery retag``: tags and caption confidence for an index, without captioning it again.

Registered from its own module (``register(sub)``, called by ``indexer/cli/__init__.py``).
"""

from __future__ import annotations

import argparse
import sys

from indexer.cli.args import EXIT_INTERRUPTED, EXIT_OK, common, config_from, tagging, wait


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retag", help="add tags and caption confidence to indexed images (an index from before tags)",
                       description="Tag the indexed images that have no tags from the configured tagger (all with "
                                   "--all) and rate the captions they already have; captions and vectors stay as "
                                   "they are. Reads and decodes each image once more and runs the image tower, "
                                   "but no caption decoding.")
    p.add_argument("--all", dest="everything", action="store_true", help="tag every image again, not only untagged ones")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 256 on a GPU, 32 on a CPU)")
    wait(p)
    common(p)
    tagging(p)
    p.set_defaults(handler=cmd_retag)


def cmd_retag(args: argparse.Namespace) -> int:
    from indexer.cli.interrupts import stop_on_interrupt
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine, stop_on_interrupt() as stop:
        counts = engine.retag(everything=args.everything, stop=stop)
    print(f"tagged {counts['images']} images ({counts['tagged']} given at least one tag, {counts['rated']} captions "
          f"rated); {counts['failed']} could not be read")
    if counts["interrupted"]:
        print("pixquery: interrupted; the tags so far are kept: run the same command again to carry on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
