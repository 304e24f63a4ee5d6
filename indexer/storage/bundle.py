"""The vector stores of one index, kept in step and committed together with the SQL rows.

Three kinds, all keyed by ``images.id``: ``images`` (image embeddings) and ``captions`` (embeddings of
the generated captions), both searchable :class:`VectorIndex`es, and ``memories`` (the caption
scorer's per-image decoder memories, a :class:`MemoryStore`, only when the index ranks with a scorer).
Every image has an image vector; it has a caption vector only when it has a caption, and a memory only
when the index has a scorer and the image was read with it.

**Commits.** Changes collect in memory. :meth:`VectorBundle.commit` writes them as new segment files
(``indexer/storage/segments.py``), merges small segments, writes manifest ``vectors/manifest-G.json``
naming every live segment, and then commits the SQL changes of the same checkpoint together with
``meta.vector_generation = G`` in one transaction. An index opens at the generation its database
names, so the vectors and the rows always come from the same checkpoint: a crash at any moment leaves
the last committed checkpoint, and the files of a checkpoint that did not commit are deleted by the
next writer. Old manifests and the segments only they name are kept for one generation, for readers
in other processes that are opening the previous one.

**Approximate search.** A large searchable kind also gets an approximate structure
(``indexer/storage/ann.py``): the manifest's ``kinds[kind]["ann"]`` names its file and the segments
whose rows it holds (a prefix of the kind's segments). Commits keep that prefix as it is (segments are
merged only after it), and decide, after writing the change, whether the structure is built (the
collection grew past ``AnnPolicy.flat_max``), trained again (it outgrew its cells), merged (the rows
after it grew past ``merge_fraction`` of it), dropped (the collection shrank) or kept; its new file is
written before the manifest that names it, so the commit protocol is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.errors import AnnFileError, IndexCorruptError
from indexer.storage import ann_build, legacy
from indexer.storage.ann import ANN_VERSION, AnnIndex, AnnInfo, AnnPolicy, choose_plan
from indexer.storage.manifest import (
    FORMAT, GENERATION_KEY, kind_entry, manifest_path, read_manifest, write_manifest,
)
from indexer.storage.segments import SegmentInfo, SegmentLog, plan_merge
from indexer.storage.store import Store, WriteBatch
from indexer.storage.vectors import MemoryStore, VectorIndex, memory_codec

log = logging.getLogger(__name__)

SEARCHABLE = ("images", "captions")
MEMORIES = "memories"


@dataclass
class Payload:
    """Everything the index holds for one image besides its file facts (what a copy carries along)."""

    image: np.ndarray  # (D,)
    caption_vec: np.ndarray | None  # (D,)
    caption: str | None
    captioner: str | None
    memory_codes: np.ndarray | None = None  # the scorer memory as stored (8-bit codes)


def describe(folder: Path, generation: int) -> dict:
    """{kind: its search structure and parameters} of a committed generation, from its manifest alone
    (what ``pixquery stats`` shows; nothing is loaded)."""
    out = {}
    kinds = read_manifest(folder, generation)["kinds"]
    for kind in SEARCHABLE:
        entry = kinds.get(kind)
        if entry is None:
            continue
        n = sum(s["puts"] for s in entry["segments"])  # rows stored (an upper bound of the live ones)
        ann = entry.get("ann")
        if ann is None:
            out[kind] = {"kind": "flat", "stored_rows": n}
        else:
            out[kind] = {**AnnInfo.from_dict(ann).describe(), "stored_rows": n}
    return out


class VectorBundle:
    """The vector stores of one index folder (``folder`` = ``<index>/vectors``)."""

    def __init__(self, folder: Path, manifest: dict, dim: int, memory_dim: int | None = None,
                 index_type: str = "auto", policy: AnnPolicy | None = None, repair: bool = False) -> None:
        """``memory_dim``: also keep scorer memories of this size (None: this index ranks without a scorer;
        stored memories are then left as they are). ``policy``: when kinds get an approximate structure
        (default: ``AnnPolicy(index_type)``). ``repair``: a missing or damaged structure file is left out
        (searched exactly, rebuilt at the next commit) instead of raising :class:`AnnFileError` (writers)."""
        self.policy = policy or AnnPolicy(index_type=index_type)
        self.folder, self.dim, self.index_type, self.repair = folder, dim, self.policy.index_type, repair
        # whether this process holds the index's write lock (indexer/storage/lock.py): only then are files
        # that no kept manifest names deleted (another process's checkpoint in progress would look like that)
        self.owner = False
        self.generation = int(manifest["generation"])
        self._next_segment = int(manifest["next_segment"])
        self._committed = manifest
        kinds = manifest["kinds"]
        for kind in SEARCHABLE:
            entry = kinds.get(kind)
            if entry is not None and entry["width"] != dim:
                raise IndexCorruptError(f"{kind} vectors have dimension {entry['width']}, expected {dim}")
        self.images = self._searchable("images")
        self.captions = self._searchable("captions")
        self.memories: MemoryStore | None = None
        self.memory_dim = memory_dim
        if memory_dim:
            code = memory_codec(memory_dim).code_size
            entry = kinds.get(MEMORIES)
            if entry is not None and entry["width"] != code:  # another scorer's: dropped at the next commit
                log.warning("stored scorer memories have another size (%s); they will be dropped", entry["width"])
                self.memories = MemoryStore(SegmentLog(folder, MEMORIES, code, np.uint8), memory_dim)
            else:
                self.memories = MemoryStore(self._log(MEMORIES, code, np.uint8), memory_dim)

    def _log(self, kind: str, width: int, dtype: type) -> SegmentLog:
        entry = self._committed["kinds"].get(kind)
        infos = [SegmentInfo(**s) for s in entry["segments"]] if entry else []
        return SegmentLog.load(self.folder, kind, width, dtype, infos)

    def _base(self, kind: str, records: SegmentLog) -> AnnIndex | None:
        """The committed approximate structure of ``kind`` (None: none, or exact search asked for)."""
        entry = self._committed["kinds"].get(kind) or {}
        raw = entry.get("ann")
        if raw is None or self.policy.index_type == "flat":
            return None
        if raw.get("version") != ANN_VERSION:  # another version's: never trusted; the next commit rebuilds it
            log.warning("%s: the approximate index %s is of another version (%s); searching exactly until "
                        "the next indexing run rebuilds it", kind, raw.get("file"), raw.get("version"))
            return None
        info = AnnInfo.from_dict(raw)
        numbers = [s.number for s in records.segments]
        try:
            if numbers[:len(info.covers)] != info.covers:
                raise AnnFileError(f"{self.folder}: the approximate index {info.file} covers segments "
                                   f"{info.covers}, not a prefix of the {kind} segments {numbers}; any indexing "
                                   f"run rebuilds it")
            return AnnIndex.load(self.folder, info)
        except AnnFileError:
            if not self.repair:
                raise
            log.warning("%s: the approximate index %s is missing or damaged; searching exactly until this "
                        "run's next commit rebuilds it", kind, info.file)
            return None

    def _searchable(self, kind: str, records: SegmentLog | None = None) -> VectorIndex:
        records = records if records is not None else self._log(kind, self.dim, np.float32)
        return VectorIndex(records, self.index_type, base=self._base(kind, records))

    @classmethod
    def open(cls, folder: Path, store: Store, dim: int, memory_dim: int | None = None,
             index_type: str = "auto", policy: AnnPolicy | None = None, repair: bool = False) -> "VectorBundle":
        """The vectors of the generation ``store`` names (an index of an older pixquery is converted first)."""
        generation = int(store.get_meta(GENERATION_KEY) or 0)
        if legacy.legacy_files(folder.parent):
            if generation == 0:
                legacy.convert(folder.parent, folder, store)
                generation = 1
            else:  # converted and committed, then interrupted before the old files went
                legacy.remove_leftovers(folder.parent)
        for attempt in range(3):
            try:
                return cls(folder, read_manifest(folder, generation), dim, memory_dim, index_type, policy, repair)
            except AnnFileError:
                raise
            except IndexCorruptError:
                # a writer in another process may have committed twice since we read the generation, and
                # collected this one's files: try the newest
                newest = int(store.get_meta(GENERATION_KEY) or 0)
                if newest == generation or attempt == 2:
                    raise
                generation = newest
        raise AssertionError("unreachable")

    # --- reading ------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        return self.images.ids()

    def __len__(self) -> int:
        return len(self.images)

    def payload(self, row_id: int, caption: str | None, captioner: str | None) -> Payload:
        ids = np.array([row_id], dtype=np.int64)
        have, cap = self.captions.reconstruct_present(ids)
        codes = None
        if self.memories is not None:
            have_mem, mem = self.memories.codes_present(ids)
            codes = mem[0] if have_mem[0] else None
        return Payload(self.images.reconstruct(ids)[0], cap[0] if caption and have[0] else None, caption,
                       captioner, codes)

    def stale(self, store: Store) -> bool:
        """Whether another process has committed a newer generation since this one was opened."""
        return int(store.get_meta(GENERATION_KEY) or 0) != self.generation

    # --- changing (in memory until commit) --------------------------------------------------------
    def add(self, ids: np.ndarray, images: np.ndarray, caption_ids: np.ndarray, captions: np.ndarray,
            memories: np.ndarray | None = None) -> None:
        """Vectors of a batch (replacing what ``ids`` held); ``memories`` (len(ids), S * D_dec) is dropped
        when this index keeps none. Caption vectors of ``ids`` without a new caption vector go."""
        self.images.put(ids, images)
        self.captions.delete(np.setdiff1d(ids, caption_ids))
        self.captions.put(caption_ids, captions)
        self.set_memories(ids, memories)

    def add_payload(self, row_id: int, payload: Payload) -> None:
        """Everything ``payload`` holds, under ``row_id`` (a copy of indexed content)."""
        ids = np.array([row_id], dtype=np.int64)
        self.images.put(ids, payload.image[None])
        if payload.caption_vec is not None:
            self.captions.put(ids, payload.caption_vec[None])
        else:
            self.captions.delete(ids)
        if self.memories is not None:
            if payload.memory_codes is not None:
                self.memories.put_codes(ids, payload.memory_codes[None])
            else:
                self.memories.delete(ids)

    def set_captions(self, ids: np.ndarray, caption_ids: np.ndarray, vectors: np.ndarray) -> None:
        """New caption vectors for ``caption_ids``; the others of ``ids`` (no caption now) lose theirs."""
        self.captions.delete(np.setdiff1d(ids, caption_ids))
        self.captions.put(caption_ids, vectors)

    def set_memories(self, ids: np.ndarray, memories: np.ndarray | None) -> None:
        """New memories of ``ids`` (float32, or uint8 already coded by the memory codec, as the model
        stage codes them on its device); without them (or of another scorer's size), what ``ids`` had
        goes, and the likelihood signal stays off for these images."""
        if self.memories is None:
            return
        if memories is None or memories.shape[1] != self.memories.dim:
            self.memories.delete(ids)
            return
        if memories.dtype == np.uint8:
            self.memories.put_codes(np.asarray(ids, np.int64), memories)
        else:
            self.memories.put(ids, memories)

    def drop_memories(self) -> None:
        """Forget every stored memory (the scorer changed); ``recaption`` writes them again."""
        if self.memories is not None:
            self.memories.delete(self.memories.ids())

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.images.delete(ids)
        self.captions.delete(ids)
        if self.memories is not None:
            self.memories.delete(ids)

    # --- commits ------------------------------------------------------------------------------
    def _logs(self) -> list[SegmentLog]:
        logs = [self.images.records, self.captions.records]
        return logs + ([self.memories.records] if self.memories is not None else [])

    @property
    def dirty(self) -> bool:
        return any(log_.dirty for log_ in self._logs())

    def commit(self, store: Store, batch: WriteBatch | None = None) -> None:
        """Write the pending vector changes and ``batch``'s SQL changes as one checkpoint (see module doc);
        the approximate structures are built, merged or dropped here when their policy says so."""
        batch = batch if batch is not None else WriteBatch()
        if not self.dirty and not self._ann_work():
            store.write(batch)
            return
        number = self._next_segment
        self.folder.mkdir(parents=True, exist_ok=True)
        anns: dict[str, dict | None] = {}
        try:
            for log_ in self._logs():
                if log_.write_pending(number) is not None:
                    number += 1
                keep = self._covered(log_.kind)  # segments an approximate structure holds are not merged
                while (run := plan_merge(log_.live_sizes()[keep:])) is not None:
                    log_.merge(run[0] + keep, run[1] + keep, number)
                    number += 1
            for kind in SEARCHABLE:
                anns[kind], number = self._maintain(kind, number)
            kinds = dict(self._committed["kinds"])  # kinds not loaded here (memories without a scorer) carry over
            kinds.update({log_.kind: kind_entry(log_) for log_ in self._logs()})
            for kind, info in anns.items():
                if info is not None:
                    kinds[kind]["ann"] = info
            manifest = {"format": FORMAT, "generation": self.generation + 1, "next_segment": number, "kinds": kinds}
            write_manifest(self.folder, manifest)
            batch.meta[GENERATION_KEY] = str(manifest["generation"])
            store.write(batch)
        except BaseException:
            self._reload()  # back to the last committed checkpoint; the files written here are garbage
            raise
        previous, self._committed = self._committed, manifest
        self.generation, self._next_segment = manifest["generation"], number
        for kind in SEARCHABLE:  # the searchable kinds follow the new structures (the exact parts start over)
            index = getattr(self, kind)
            if (index.base.info.to_dict() if index.base is not None else None) != anns[kind]:
                setattr(self, kind, self._searchable(kind, index.records))
        if self.owner:
            self.collect_garbage(keep=(previous, manifest))

    def _covered(self, kind: str) -> int:
        index = getattr(self, kind, None) if kind in SEARCHABLE else None
        return index.covered if index is not None else 0

    def _decide(self, kind: str) -> str:
        """What the commit does with ``kind``'s approximate structure: keep, build, merge or drop."""
        index: VectorIndex = getattr(self, kind)
        n = len(index.records)
        plan = choose_plan(n, self.dim, self.policy)
        base = index.base.info if index.base is not None else None
        if plan is None:
            shrunk = self.policy.index_type != "auto" or n < self.policy.flat_max // 2 or base is None
            return "drop" if base is not None and shrunk else "keep"
        if base is None or base.m != plan.m or plan.nlist >= 2 * base.nlist or plan.nlist * 4 <= base.nlist:
            return "build"
        changed = len(index._stale)  # ids put or deleted since it was built
        if changed >= max(self.policy.merge_min, self.policy.merge_fraction * base.n):
            return "merge"
        return "keep"

    def _ann_work(self) -> bool:
        return any(self._decide(kind) != "keep" for kind in SEARCHABLE)

    def _maintain(self, kind: str, number: int) -> tuple[dict | None, int]:
        """(the manifest's ``ann`` entry of ``kind`` after this commit, the next free file number)."""
        index: VectorIndex = getattr(self, kind)
        action = self._decide(kind)
        current = index.base.info.to_dict() if index.base is not None else None
        if action == "keep":
            return current, number
        if action == "drop":
            log.info("%s: %d vectors, searched exactly from now on", kind, len(index.records))
            return None, number
        if action == "merge":
            info = ann_build.merge_into(index.records, index.base.info, self.folder, number)
        else:
            plan = choose_plan(len(index.records), self.dim, self.policy)
            queries, source = self._recall_queries(kind)
            info = ann_build.build(index.records, plan, self.policy, self.folder, number, queries, source)
        return info.to_dict(), number + 1

    def _recall_queries(self, kind: str) -> tuple[np.ndarray | None, str | None]:
        """Text-like queries for the image vectors: a sample of the caption vectors (None: the kind's own)."""
        if kind != "images":
            return None, None
        records = self.captions.records
        ids = records.ids()
        if len(ids) < 50:
            return None, None
        pick = np.sort(np.random.default_rng(2).choice(ids, min(len(ids), self.policy.recall_queries), replace=False))
        return records.get(pick)[1], f"{len(pick)} stored caption vectors (text-like queries)"

    def _reload(self) -> None:
        for log_ in self._logs():
            entry = self._committed["kinds"].get(log_.kind)
            log_.reload([SegmentInfo(**s) for s in entry["segments"]] if entry else [])
        # the search structures follow the records again
        self.images = self._searchable("images", self.images.records)
        self.captions = self._searchable("captions", self.captions.records)

    def collect_garbage(self, keep: tuple[dict, ...] | None = None) -> int:
        """Delete manifests and segment files that none of ``keep`` (default: the committed manifest and
        the one before it) names: older generations, and what a checkpoint that never committed left
        behind. Only the process that holds the index's write lock may call this (:attr:`owner`).
        Returns the number of files deleted."""
        if not self.folder.is_dir():
            return 0
        if keep is None:
            keep = (self._committed,)
            if manifest_path(self.folder, self.generation - 1).exists():  # readers may still be opening it
                keep += (read_manifest(self.folder, self.generation - 1),)
        wanted = {manifest_path(self.folder, m["generation"]).name for m in keep if m["generation"]}
        for manifest in keep:
            for kind, entry in manifest["kinds"].items():
                for s in entry["segments"]:
                    stem = f"{kind}-{s['number']:08d}"
                    wanted |= {f"{stem}.ids.npy", f"{stem}.rows.npy", f"{stem}.del.npy"}
                if entry.get("ann"):
                    wanted.add(entry["ann"]["file"])
        removed = 0
        for path in self.folder.iterdir():
            if path.name not in wanted and path.suffix in (".npy", ".json", ".tmp", ".faiss"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
