"""``pixquery doctor``: check that an index is consistent, and say what is not.

The checks, each reported as ``ok``, ``problem`` or ``note``:

* database: the database's own integrity check, and the schema version;
* provenance: the encoder the index records, and that every row's vector came from it;
* vectors: the manifest of the committed generation and every segment file it names are present and
  readable; files that no kept manifest names (left by a checkpoint that never committed);
* rows: every row has an image vector, every vector a row; every caption a caption vector and no
  caption vector without a caption; no empty captions; no scorer memory without a row (rows without a
  memory are a note: ``recaption`` writes them);
* keywords: the keyword index matches the captions;
* files: every indexed file still exists (a file gone from a folder that is still there, or a whole
  folder gone: an unmounted drive?); no skip record for a file that is indexed;
* ids: the next id is above every id used.

What it finds is a :class:`Findings`; ``indexer/storage/repair.py`` repairs from it. Nothing here
writes. The caller holds the index's write lock, so no checkpoint lands in the middle of the checks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from indexer.errors import IndexCorruptError
from indexer.storage.bundle import GENERATION_KEY, MEMORIES, VectorBundle, manifest_path, read_manifest
from indexer.storage.schema import SCHEMA_VERSION
from indexer.storage.store import Store

NEXT_ID_KEY = "next_id"  # as indexing/writer.py keeps it
_MANIFEST = re.compile(r"manifest-(\d{8})\.json$")


@dataclass
class Check:
    name: str
    status: str  # "ok", "problem" or "note"
    message: str


@dataclass
class Findings:
    """Everything the checks found, with the ids and paths a repair needs."""

    checks: list[Check] = field(default_factory=list)
    generation: int = 0  # the committed vector generation
    vectors_problem: str | None = None  # the committed generation cannot be read
    fallback: int | None = None  # then: the newest older generation that reads (0: none, start empty)
    changed_since_fallback: list[int] = field(default_factory=list)  # rows whose vectors it does not hold
    stray_vectors: list[int] = field(default_factory=list)
    rows_without_vectors: list[int] = field(default_factory=list)
    missing_caption_vectors: list[int] = field(default_factory=list)
    stray_caption_vectors: list[int] = field(default_factory=list)
    stray_memories: list[int] = field(default_factory=list)
    empty_captions: list[int] = field(default_factory=list)
    other_encoder: list[int] = field(default_factory=list)
    missing_files: list[int] = field(default_factory=list)  # gone from a folder that is still there
    missing_folders: list[int] = field(default_factory=list)  # under a folder that is gone itself
    indexed_skips: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    keywords_problem: str | None = None
    database_problems: list[str] = field(default_factory=list)
    no_encoder: bool = False
    next_id: int | None = None  # the next id to record, when the recorded one is too low

    def add(self, name: str, status: str, message: str) -> None:
        self.checks.append(Check(name, status, message))

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"consistent": self.consistent, "generation": self.generation,
                "checks": [c.__dict__ for c in self.checks]}


def stored_memory_width(folder: Path, generation: int) -> int | None:
    """The code size of the scorer memories the manifest of ``generation`` names (None: none)."""
    try:
        entry = read_manifest(folder, generation)["kinds"].get(MEMORIES)
    except IndexCorruptError:
        return None
    return int(entry["width"]) if entry else None


def manifest_generations(folder: Path) -> list[int]:
    """The generations whose manifest files are in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = (_MANIFEST.match(p.name) for p in folder.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _open_vectors(folder: Path, store: Store, dim: int, findings: Findings) -> VectorBundle:
    """The committed generation's vectors; if they cannot be read, the newest older generation that can
    (or none), with the rows it does not hold recorded in ``findings``."""
    generation = findings.generation
    try:
        return VectorBundle.open(folder, store, dim, stored_memory_width(folder, generation))
    except IndexCorruptError as exc:
        findings.vectors_problem = str(exc)
    for g in [g for g in manifest_generations(folder) if g < generation] + [0]:
        try:
            bundle = VectorBundle(folder, read_manifest(folder, g), dim, stored_memory_width(folder, g))
        except IndexCorruptError:
            continue
        findings.fallback = g
        since = _written_at(folder, g)
        findings.changed_since_fallback = [
            r.id for r in store.all_images()
            if since is None or r.indexed_at > since or (r.captioned_at is not None and r.captioned_at > since)]
        return bundle
    raise AssertionError("generation 0 always reads")


def _written_at(folder: Path, generation: int) -> datetime | None:
    """When the manifest of ``generation`` was written, as the rows' UTC times are kept (None for 0)."""
    if generation == 0:
        return None
    stamp = manifest_path(folder, generation).stat().st_mtime
    return datetime.fromtimestamp(stamp, timezone.utc).replace(tzinfo=None)


def _wanted_files(folder: Path, generations: list[int]) -> set[str]:
    wanted: set[str] = set()
    for g in generations:
        if g == 0:
            continue
        try:
            manifest = read_manifest(folder, g)
        except IndexCorruptError:
            continue
        wanted.add(manifest_path(folder, g).name)
        for kind, entry in manifest["kinds"].items():
            for s in entry["segments"]:
                stem = f"{kind}-{s['number']:08d}"
                wanted |= {f"{stem}.ids.npy", f"{stem}.rows.npy", f"{stem}.del.npy"}
    return wanted


def diagnose(store: Store, folder: Path) -> tuple[Findings, VectorBundle | None]:
    """Run every check on the index whose vectors are in ``folder``; also returns the vectors it read
    (None when the index records no encoder, so their dimension is unknown)."""
    from indexer import provenance

    f = Findings(generation=int(store.get_meta(GENERATION_KEY) or 0))
    f.database_problems = store.integrity_problems()
    version = store.get_meta("schema_version")
    if f.database_problems:
        f.add("database", "problem", "the database is damaged: " + "; ".join(f.database_problems[:5]))
    else:
        f.add("database", "ok" if version == str(SCHEMA_VERSION) else "problem",
              f"integrity check passed; schema {version} (this pixquery writes {SCHEMA_VERSION})")
    rows = store.all_images()
    info = provenance.built_with(store)
    if info is None:  # without the encoder's dimension the vectors cannot be read
        f.no_encoder = bool(rows)
        f.add("provenance", "problem" if rows else "ok",
              f"{len(rows)} rows but no encoder recorded" if rows else "an empty index (no encoder recorded yet)")
        return f, None
    f.other_encoder = sorted(r.id for r in rows if r.encoder != info.fingerprint)
    f.add("provenance", "problem" if f.other_encoder else "ok",
          f"{len(f.other_encoder)} of {len(rows)} rows were embedded by another encoder than the index's "
          f"{info.name} (dim {info.dim})" if f.other_encoder else
          f"encoder {info.name} (dim {info.dim}); all {len(rows)} rows embedded by it")
    vectors = _open_vectors(folder, store, info.dim, f)
    if f.vectors_problem is not None:
        back = (f"generation {f.fallback} reads: a repair goes back to it and drops the "
                f"{len(f.changed_since_fallback)} rows written since (their files are indexed again)"
                if f.fallback else "no older generation reads: a repair drops every row (index the folders again)")
        f.add("vectors", "problem", f"{f.vectors_problem}; {back}")
    else:
        files = sum(len(log_.files()) for log_ in vectors._logs())
        f.add("vectors", "ok", f"generation {f.generation}: its manifest and {files} segment files are readable")
    _check_rows(f, rows, vectors)
    _check_files(f, rows, store)
    keep = [f.fallback if f.fallback is not None else f.generation]
    keep.append(keep[0] - 1)
    wanted = _wanted_files(folder, keep)
    f.stray_files = sorted(p.name for p in folder.iterdir()
                           if p.name not in wanted and p.suffix in (".npy", ".json", ".tmp")) if folder.is_dir() else []
    # harmless (no generation names them; the next writer deletes them), but --repair tidies them up
    f.add("leftovers", "note" if f.stray_files else "ok",
          f"{len(f.stray_files)} vector files that no kept manifest names (left by an interrupted checkpoint; "
          f"the next indexing run deletes them)" if f.stray_files else "no vector files left over")
    f.keywords_problem = ("; ".join(store.keywords.check()) or None) if store.keywords is not None else None
    f.add("keywords", "problem" if f.keywords_problem else ("ok" if store.keywords is not None else "note"),
          f.keywords_problem or ("the keyword index matches the captions" if store.keywords is not None
                                 else "this database has no keyword index to check"))
    recorded = int(store.get_meta(NEXT_ID_KEY) or 0)
    highest = max((r.id for r in rows), default=0)
    highest = max(highest, int(vectors.ids().max(initial=0)))
    if recorded and recorded <= highest:
        f.next_id = highest + 1
        f.add("ids", "problem", f"the next id recorded ({recorded}) is not above the highest id used ({highest})")
    unfinished = store.unfinished_runs()
    if unfinished:
        f.add("runs", "note", f"{unfinished} indexing runs did not finish (killed or interrupted); "
                              f"what they committed is kept")
    return f, vectors


def _check_rows(f: Findings, rows: list, vectors: VectorBundle) -> None:
    row_ids = {r.id for r in rows}
    captioned = {r.id for r in rows if r.caption}
    vec_ids = set(vectors.ids().tolist())
    cap_ids = set(vectors.captions.ids().tolist())
    f.stray_vectors = sorted(vec_ids - row_ids)
    f.rows_without_vectors = sorted((row_ids - vec_ids) - set(f.changed_since_fallback))
    f.missing_caption_vectors = sorted((captioned - cap_ids) - set(f.changed_since_fallback)
                                       - set(f.rows_without_vectors))  # (those rows go whole)
    f.stray_caption_vectors = sorted(cap_ids - captioned)
    f.empty_captions = sorted(r.id for r in rows if r.caption is not None and not r.caption.strip())
    parts = [(f.stray_vectors, "image vectors without a row"), (f.rows_without_vectors, "rows without an image vector"),
             (f.missing_caption_vectors, "captions without a caption vector"),
             (f.stray_caption_vectors, "caption vectors without a caption"), (f.empty_captions, "empty captions")]
    if vectors.memories is not None:
        mem_ids = set(vectors.memories.ids().tolist())
        f.stray_memories = sorted(mem_ids - row_ids)
        parts.append((f.stray_memories, "scorer memories without a row"))
        if row_ids - mem_ids:
            f.add("memories", "note", f"{len(row_ids - mem_ids)} of {len(row_ids)} images have no scorer memory "
                                      f"(pixquery recaption writes them)")
    bad = [f"{len(ids)} {what}" for ids, what in parts if ids]
    f.add("rows", "problem" if bad else "ok", "; ".join(bad) if bad else
          f"{len(row_ids)} rows, each with its image vector; {len(captioned)} captions, each with its vector")


def _check_files(f: Findings, rows: list, store: Store) -> None:
    folders: dict[str, bool] = {}
    for r in rows:
        if os.path.lexists(r.path):
            continue
        parent = os.path.dirname(r.path)
        if parent not in folders:
            folders[parent] = os.path.isdir(parent)
        (f.missing_files if folders[parent] else f.missing_folders).append(r.id)
    if f.missing_files or f.missing_folders:
        gone = sorted(p for p, there in folders.items() if not there)
        f.add("files", "problem",
              f"{len(f.missing_files)} indexed files are gone from their folders; {len(f.missing_folders)} are "
              f"under {len(gone)} folders that are gone themselves"
              + (f" (e.g. {gone[0]}: an unmounted drive?)" if gone else ""))
    else:
        f.add("files", "ok", f"all {len(rows)} indexed files exist")
    indexed = {r.path for r in rows}
    f.indexed_skips = sorted(s.path for s in store.skipped() if s.path in indexed)
    if f.indexed_skips:
        f.add("skipped", "problem", f"{len(f.indexed_skips)} files are both indexed and recorded as skipped")
