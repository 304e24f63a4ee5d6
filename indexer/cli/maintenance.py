"""Looking after an index: ``pixquery doctor`` checks that it is consistent and, with ``--repair``,
fixes what it can and says what it could not.

Exit codes: 0 consistent (after the repair, with ``--repair``); 1 problems remain; 3 no index; 5 another
process is writing the index (``--wait`` waits for it).
"""

from __future__ import annotations

import argparse
import json

from indexer.cli.args import EXIT_ERROR, EXIT_OK, common, config_from, wait

MARKS = {"ok": "ok     ", "problem": "PROBLEM", "note": "note   "}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the maintenance commands to ``pixquery``'s sub-command parser."""
    p = sub.add_parser("doctor", help="check that the index is consistent (and --repair it)",
                       description="Check the index: the database, the vectors of the committed checkpoint and "
                                   "their files, that every row has its vectors and keyword entry and nothing "
                                   "is orphaned, the models it records, and that the indexed files still exist. "
                                   "Needs no model. --repair fixes what it can (rows that cannot be made whole "
                                   "leave the index and are indexed again by the next run over their folder; "
                                   "image files are never touched) and says what it could not.")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed, then check again")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    wait(p)
    common(p)
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine:
        findings, fixed, not_fixed = engine.doctor(repair=args.repair)
        where = engine.config.index_dir
    if args.json:
        out = findings.to_dict()
        if args.repair:
            out["fixed"], out["not_fixed"] = fixed, not_fixed
        print(json.dumps(out))
    else:
        print(f"pixquery doctor: index {where} (vector generation {findings.generation})")
        for check in findings.checks:
            print(f"  {MARKS[check.status]}  {check.name}: {check.message}")
        for line in fixed:
            print(f"  fixed    {line}")
        for line in not_fixed:
            print(f"  NOT FIXED  {line}")
        if findings.consistent:
            print("the index is consistent")
        else:
            print(f"{len(findings.problems)} problems" + ("" if args.repair else ": pixquery doctor --repair fixes "
                                                                                  "what it can"))
    return EXIT_OK if findings.consistent else EXIT_ERROR
