"""Commands for the teams that build on pixquery: ``serve`` (the HTTP API), ``meta`` (catalogue metadata:
import, fields, drop) and ``export`` (captions and metadata as CSV / JSON, alt text for a site's HTML).

FastAPI and uvicorn (the optional extra ``api``) are imported only when ``serve`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from indexer.cli.args import EXIT_OK, EXIT_USAGE, common, config_from, filters, filters_from


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``meta`` and ``export`` to ``pixquery``'s sub-command parser."""
    p = sub.add_parser("serve", help="serve the HTTP JSON API (search, images, captions, indexing; docs at /docs)",
                       description="Serve pixquery's HTTP JSON API on http://HOST:PORT (OpenAPI docs at /docs). "
                                   "Only this computer can reach it by default (127.0.0.1). Serving on any other "
                                   "address needs a token: set PIXQUERY_API_TOKEN to a random secret, and clients "
                                   "send 'Authorization: Bearer <token>' (when set, it is required on 127.0.0.1 too).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--index-folder", action="append", default=[], metavar="DIR",
                   help="a folder clients may start indexing through POST /api/index (repeat; default: none)")
    common(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("meta", help="catalogue metadata: import a CSV, list or drop fields")
    msub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    m = msub.add_parser("import", help="attach the columns of a CSV (SKU, title, price, ...) to indexed images",
                        description="Attach every column of FILE.csv to the indexed images its key column names. "
                                    "Columns are typed text, number or date (YYYY-MM-DD), from --type or from their "
                                    "values; the whole file is checked before anything is written, and rows "
                                    "whose key matches no image are reported. Importing again updates: a row "
                                    "replaces that image's values of the file's columns (an empty cell removes one).")
    m.add_argument("file", metavar="FILE.csv")
    m.add_argument("--key", default="path", choices=("path", "file", "sha256", "hash"),
                   help="how rows name images: path (absolute, or relative to --base), file (the file name), "
                        "sha256 (of the file's bytes; every indexed file is read), hash (the index's content "
                        "hash, as pixquery export writes it); default path")
    m.add_argument("--key-column", metavar="NAME", help="the key's column (default: the --key name)")
    m.add_argument("--delimiter", default=",", help="column separator (default ','; 'tab' for tabs)")
    m.add_argument("--encoding", default="utf-8-sig", help="text encoding (default UTF-8, with or without a BOM)")
    m.add_argument("--type", dest="types", action="append", default=[], metavar="FIELD=KIND",
                   help="a column's type: text, number or date (repeat, or a comma list)")
    m.add_argument("--keyword-fields", metavar="A,B",
                   help="text fields whose words the meta keyword signal searches (default: every text field; "
                        "'' for none)")
    m.add_argument("--base", metavar="DIR", help="folder relative paths start from (default: the CSV's folder)")
    m.add_argument("--replace", action="store_true", help="forget every catalogue field first")
    m.add_argument("--strict", action="store_true", help="refuse the file if any key matches no image")
    m.add_argument("--json", action="store_true", help="print the report as JSON (with every unmatched key)")
    common(m)
    m.set_defaults(handler=cmd_meta_import)
    m = msub.add_parser("fields", help="list the catalogue fields, their types and value counts")
    m.add_argument("--json", action="store_true")
    common(m)
    m.set_defaults(handler=cmd_meta_fields)
    m = msub.add_parser("drop", help="forget a catalogue field and its values")
    m.add_argument("field")
    common(m)
    m.set_defaults(handler=cmd_meta_drop)

    p = sub.add_parser("export", help="write captions and metadata as CSV / JSON, or alt text into a site's HTML",
                       description="Write path, caption, captioner, dimensions, dates and catalogue fields of every "
                                   "image (or those the filters leave) as CSV, JSON lines or JSON. With "
                                   "--alt-text-html DIR: show, as a diff, the alt attributes the captions would "
                                   "give the <img> tags of DIR's HTML files that show indexed images; --apply "
                                   "writes them.")
    p.add_argument("--format", default="csv", choices=("csv", "jsonl", "json"))
    p.add_argument("--fields", metavar="A,B", help="columns, comma separated (default: path, caption, captioner, "
                                                   "caption_uncertain, width, height, file_type, taken_at, "
                                                   "modified_at and every catalogue field; --list-fields lists them)")
    p.add_argument("--list-fields", action="store_true", help="list the fields that can be exported")
    p.add_argument("-o", "--out", metavar="FILE", help="write here (default: standard output)")
    a = p.add_argument_group("alt text for a site's HTML files")
    a.add_argument("--alt-text-html", metavar="DIR", help="fill in alt attributes of <img> tags in DIR's HTML files")
    a.add_argument("--alt-field", metavar="FIELD", help="a catalogue field to use as alt text where set (else the caption)")
    a.add_argument("--overwrite", action="store_true", help="replace alt text that is there already")
    a.add_argument("--fill-empty", action="store_true", help='also fill alt="" (which marks decorative images)')
    a.add_argument("--apply", action="store_true", help="write the changes (default: print them as a diff)")
    filters(p)
    common(p)
    p.set_defaults(handler=cmd_export)


# --- serve ---------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from indexer.api.settings import ApiSettings, check_bind
    from retrieval.errors import InputError

    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    settings = ApiSettings(index_folders=tuple(Path(f) for f in args.index_folder))
    check_bind(args.host, settings)
    try:
        from indexer.api.app import create_app
        from indexer.api.server import serve
    except ImportError as exc:
        raise InputError(f"pixquery serve needs FastAPI and uvicorn ({exc.name} is missing): "
                         f"pip install 'pixquery[api]'") from None
    config = config_from(args)
    config.progress = False
    app = create_app(config, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pixquery API: http://{host}:{args.port}/docs  (index {config.index_dir}; "
          f"{'token required' if settings.token else 'no token'}; stop with Ctrl+C)", file=sys.stderr)
    serve(app, args.host, args.port, "info" if args.verbose else "warning")
    return EXIT_OK


# --- meta ----------------------------------------------------------------------------------------------
def cmd_meta_import(args: argparse.Namespace) -> int:
    from indexer.catalogue.csv_import import parse_types
    from indexer.engine import Engine

    delimiter = "\t" if args.delimiter.lower() in ("tab", "\\t") else args.delimiter
    keyword = None if args.keyword_fields is None else [f for f in args.keyword_fields.split(",") if f.strip()]
    with Engine(config_from(args)) as engine:
        report = engine.catalogue.import_csv(
            args.file, key=args.key, key_column=args.key_column, delimiter=delimiter, encoding=args.encoding,
            types=parse_types(args.types), keyword_fields=keyword, base=Path(args.base) if args.base else None,
            replace=args.replace, strict=args.strict)
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    kinds = ", ".join(f"{name} ({kind})" for name, kind in report["fields"].items())
    print(f"imported {report['values']} values of {len(report['fields'])} fields for {report['images']} images "
          f"from {report['matched_rows']} of {report['rows']} rows in {report['seconds']:.1f} s: {kinds}")
    if report["ambiguous"]:
        print(f"  {report['ambiguous']} keys matched more than one image (each got the row)")
    if report["unreadable"]:
        print(f"  {report['unreadable']} indexed files could not be read to hash them")
    if report["unmatched"]:
        shown = ", ".join(report["unmatched"][:10])
        print(f"  {len(report['unmatched'])} keys match no indexed image: {shown}"
              f"{' ...' if len(report['unmatched']) > 10 else ''} (all of them: --json)")
    return EXIT_OK


def cmd_meta_fields(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine:
        fields = engine.catalogue.fields()
    if args.json:
        print(json.dumps(fields))
        return EXIT_OK
    if not fields:
        print("no catalogue fields (import some with: pixquery meta import FILE.csv)")
    for f in fields:
        print(f"{f['name']:24s} {f['kind']:7s} {f['values']:8d} values{'  (keyword)' if f['keyword'] else ''}")
    return EXIT_OK


def cmd_meta_drop(args: argparse.Namespace) -> int:
    from indexer.engine import Engine

    with Engine(config_from(args)) as engine:
        n = engine.catalogue.drop(args.field)
    print(f"dropped {args.field} ({n} values)")
    return EXIT_OK


# --- export --------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from indexer.catalogue import export
    from indexer.engine import Engine

    if args.list_fields:
        with Engine(config_from(args)) as engine:
            names = [f["name"] for f in engine.catalogue.fields()]
        for field in export.FIELDS.values():
            print(f"{field.name:20s} {field.help}")
        for column, name in export.catalogue_columns(names).items():
            print(f"{column:20s} catalogue field {name}")
        return EXIT_OK
    if args.alt_text_html:
        return _alt_text(args)
    with Engine(config_from(args)) as engine:
        filters = filters_from(args)
        rows = engine.rows(filters if filters.active else None)
        catalogue = [f["name"] for f in engine.catalogue.fields()]
        requested = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
        columns, meta = export.columns_for(requested, catalogue)
        values = engine.catalogue.values([r.id for r in rows]) if meta else {}
        described = ({d.id: d for d in engine.describe([r.id for r in rows])}
                     if export.needs_descriptions(columns) else None)
        recs = export.records(rows, values, columns, meta, described)
        if args.out:
            n = export.write_file(recs, columns, args.format, Path(args.out))
            print(f"wrote {n} images to {args.out}", file=sys.stderr)
        else:
            export.write(recs, columns, args.format, sys.stdout)
    return EXIT_OK


def _alt_text(args: argparse.Namespace) -> int:
    from indexer.catalogue import alt_text
    from indexer.engine import Engine
    from retrieval.errors import InputError

    site = Path(args.alt_text_html).expanduser()
    if not site.is_dir():
        raise InputError(f"{site} is not a folder")
    with Engine(config_from(args)) as engine:
        rows = {r.id: r for r in engine.rows()}
        lookup = alt_text.Lookup([(r.id, r.path, r.content_hash) for r in rows.values()], rows.get)
        if args.alt_field and args.alt_field not in {f["name"] for f in engine.catalogue.fields()}:
            raise InputError(f"no catalogue field {args.alt_field!r} (pixquery meta fields lists them)")
        pages, unreadable = alt_text.plan(site, lookup, lambda i: engine.catalogue.values([i]).get(i, {}), args.alt_field,
                                          args.overwrite, args.fill_empty,
                                          threshold=engine.caption_threshold())
    changed = [p for p in pages if p.changes]
    n_changes = sum(len(p.changes) for p in changed)
    skips = [(p.path, src, why) for p in pages for src, why in p.skipped]
    if args.apply:
        written = alt_text.apply(changed)
        print(f"wrote alt text for {n_changes} images into {written} HTML files", file=sys.stderr)
    else:
        sys.stdout.write(alt_text.diff(changed, site))
        print(f"{n_changes} alt attributes in {len(changed)} HTML files would change (dry run; --apply writes them)",
              file=sys.stderr)
    for path, src, why in skips[:50]:
        print(f"  left {os.path.relpath(path, site.resolve())}: {src or '(no src)'}: {why}", file=sys.stderr)
    if len(skips) > 50:
        print(f"  ... and {len(skips) - 50} more images left as they are", file=sys.stderr)
    for path, why in unreadable:
        print(f"  could not read {path}: {why}", file=sys.stderr)
    return EXIT_USAGE if unreadable and not pages else EXIT_OK
