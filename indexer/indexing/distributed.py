"""Indexing on a Ray cluster: the reader and model stages run as Ray Data, the decisions and writes stay here.

``pixquery index FOLDER --ray [ADDRESS]`` (needs ``pip install "pixquery[ray]"``). The run is the same
:class:`~indexer.indexing.pipeline.Run` as a single-process one, with two stages replaced:

* the driver (this process) lists the folder and sorts it against the index (``plan.triage``); only
  the files that need reading go to the cluster;
* Ray Data reads that file list (``ray.data.from_items``) and ``map_batches`` it through a pool of
  actors (:class:`EmbedStage`, ``ActorPoolStrategy``), each holding the models once (one actor per GPU
  where the cluster has GPUs, else one per CPU): an actor reads and hashes each file, decodes and
  embeds the ones whose content the index does not hold (the same ``reader.read_file`` and model stage
  as a single-process run), and returns a block of columns (``shards.py``);
* the driver receives the blocks in file order, writes each as a shard file, and feeds its rows to the
  same decision table (``plan.decide``), id allocation and :class:`~indexer.indexing.writer.BatchWriter`
  checkpoints as a single-process run: same ids, provenance and incremental rules, and a re-run only
  processes what changed.

Failures: an actor that dies is restarted by Ray and its batch retried (Ray Data's actor pool default);
a driver that stops leaves its committed checkpoints and the shards received since, which the next run
merges instead of computing again. Ray is imported only here, and only when a run uses it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from indexer.errors import EncoderMismatchError, InputError
from indexer.indexing.discover import FileEntry
from indexer.indexing.models import BatchOutput, ImageModels
from indexer.indexing.pipeline import Indexer, IndexSummary, Run, embed
from indexer.indexing.reader import ReadResult, read_in_order
from indexer.indexing.shards import SHARD_DIR, FileResult, ShardStore, from_block, models_key, to_block
from indexer.storage.schema import ImageRow
from retrieval.errors import PixqueryError

log = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: $RAY_ADDRESS if set, else the Ray on this machine (started if none)


@dataclass(frozen=True)
class RayOptions:
    address: str = LOCAL  # "local", "auto" (a cluster started on this machine), HOST:PORT or ray://HOST:PORT
    actors: int | None = None  # None: one per GPU of the cluster, else one per CPU
    connect_timeout_s: float = 60.0  # an address that does not answer within this is an error
    verbose: bool = False  # worker logs and Ray's progress on stderr


@dataclass
class RaySummary(IndexSummary):
    ray_address: str = ""
    actors: int = 0
    gpus_per_actor: float = 0.0
    sent_to_ray: int = 0  # files the workers read
    from_shards: int = 0  # files whose results a stopped run had already received


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    threads: int  # decoding threads per actor


def plan_actors(nodes: Sequence[Mapping[str, float]], actors: int | None = None, use_gpu: bool = True) -> ActorPlan:
    """How many model actors to run on a cluster whose nodes have these resources (``ray.nodes()``).

    With GPUs: one actor per GPU (at most ``actors``), each with the CPUs its node has per GPU for
    decoding. Without: one single-CPU actor per CPU (at most ``actors``).
    """
    if actors is not None and actors < 1:
        raise InputError("--ray-actors must be at least 1")
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1] if use_gpu else []
    if gpu_nodes:
        gpus = sum(int(n["GPU"]) for n in gpu_nodes)
        per_gpu = max(1, min(int(n.get("CPU", 1) // int(n["GPU"])) for n in gpu_nodes))
        return ActorPlan(min(actors or gpus, gpus), float(per_gpu), 1.0, per_gpu)
    cpus = sum(int(n.get("CPU", 0)) for n in nodes)
    if cpus < 1:
        raise InputError("the Ray cluster has no CPU to run the models on")
    return ActorPlan(min(actors or cpus, cpus), 1.0, 0.0, 1)


class HashSet:
    """Content hashes (hex text) in a sorted array: ``in`` for the workers, compact to ship to each actor."""

    def __init__(self, hashes: Sequence[str]) -> None:
        self.sorted = np.sort(np.array([h.encode() for h in hashes], dtype=bytes)) if len(hashes) else \
            np.array([], dtype="S1")

    def __contains__(self, content_hash: object) -> bool:
        if not isinstance(content_hash, str) or not len(self.sorted):
            return False
        key = content_hash.encode()
        i = int(np.searchsorted(self.sorted, key))
        return i < len(self.sorted) and self.sorted[i] == key

    def __len__(self) -> int:
        return len(self.sorted)


# --- the workers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineModels:
    """Builds an engine's model stage on a worker (picklable: a config with the encoder named)."""

    config: object  # indexer.config.EngineConfig

    def __call__(self) -> ImageModels:
        import ray

        from indexer.engine import Engine

        # the GPU Ray gave this actor is its "cuda" (Ray sets CUDA_VISIBLE_DEVICES); an actor without one: CPU
        return Engine(replace(self.config, device="cuda" if ray.get_gpu_ids() else "cpu")).models()


class EmbedStage:
    """A Ray Data actor: the reader and model stages for one batch of files at a time (models loaded once)."""

    def __init__(self, build_models: Callable[[], ImageModels], known: HashSet, threads: int = 1) -> None:
        self.models = build_models()
        self.key = models_key(self.models)
        self.known = known
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        scorer = self.models.scorer
        self.memory_dim = int(np.prod(scorer.memory_shape)) if scorer is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = [FileEntry(str(p), int(s), float(m)) for p, s, m in zip(batch["path"], batch["size"], batch["mtime"])]
        jobs = ((e.path, e) for e in entries)
        results = list(read_in_order(self.pool, jobs, self.models, self.known, max(1, len(entries))))
        todo = [i for i, r in enumerate(results) if r.error is None and r.pixels is not None]
        out = where = cap_vecs = None
        if todo:
            out, where, cap_vecs = embed(self.models, [results[i] for i in todo])
        return to_block(entries, results, todo, out, where, cap_vecs, self.models.encoder.dim, self.memory_dim,
                        self.key)


# --- connecting -----------------------------------------------------------------------------------------
def import_ray():  # noqa: ANN201 - the ray module
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError('indexing with --ray needs Ray: pip install "pixquery[ray]" (or pip install "ray[data]")') \
            from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit address, None for "local" / "auto"; bad ones raise InputError."""
    if address in (LOCAL, "auto"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"a Ray address looks like HOST:PORT or ray://HOST:PORT (or auto), not {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(options: RayOptions) -> str:
    """The address to connect to ($RAY_ADDRESS for "local" when set); an explicit one that refuses
    connections, or cannot be reached at all, raises :class:`InputError` at once."""
    address = options.address
    if address == LOCAL and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=min(10.0, options.connect_timeout_s)).close()
        except OSError as exc:
            raise InputError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one "
                             f"with `ray start --head` there, or check the address") from None
    return address


def connect(options: RayOptions) -> bool:
    """Connect to the cluster of ``options`` (or start Ray on this machine); True when this call did.

    An address that refuses or does not answer raises :class:`InputError` (exit 2) within
    ``connect_timeout_s`` instead of waiting for Ray's own retries.
    """
    ray = import_ray()
    level = logging.INFO if options.verbose else logging.WARNING
    logging.getLogger("ray.data").setLevel(level)  # Ray Data logs each dataset's plan and progress at INFO
    if ray.is_initialized():
        return False
    address = check_reachable(options)
    kwargs = {"log_to_driver": options.verbose, "logging_level": level}
    if address == LOCAL:  # on this thread: Ray's processes die with the thread that started them
        ray.init(include_dashboard=False, **kwargs)
        return True
    box: dict = {}

    def init() -> None:
        try:  # connecting (not starting) may run on another thread, so a silent address cannot hang the run
            ray.init(address=address, **kwargs)
            box["ok"] = True
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc

    thread = threading.Thread(target=init, name="pixquery-ray-init", daemon=True)
    thread.start()
    thread.join(options.connect_timeout_s)
    if thread.is_alive():
        raise InputError(f"the Ray cluster at {address} did not answer within "
                         f"{options.connect_timeout_s:g} s (is it a Ray head node's GCS port, 6379 by default?)")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, (ConnectionError, TimeoutError, ValueError)):
            raise InputError(f"cannot connect to the Ray cluster at {address}: {exc} (a cluster with token "
                             f"authentication also needs RAY_AUTH_MODE=token and its token here)") from None
        raise exc
    return True


def _unwrap(exc: BaseException) -> BaseException:
    """The pixquery error inside a Ray error, if there is one (a worker's ModelLoadError, say)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PixqueryError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


# --- the run ------------------------------------------------------------------------------------------
class RayRun(Run):
    """A :class:`Run` whose reading and model stages run on Ray (see the module's docstring)."""

    def __init__(self, indexer: Indexer, root: Path, options: RayOptions, build_models: Callable[[], ImageModels],
                 shard_dir: Path, use_gpu: bool = True) -> None:
        super().__init__(indexer, root)
        self.options, self.build_models, self.use_gpu = options, build_models, use_gpu
        self.summary = RaySummary(root=str(root), ray_address=options.address)
        self.shards = ShardStore(shard_dir, models_key(indexer.models))
        self.outputs: dict[str, FileResult] = {}  # embedded files handed to the run, until their batch is written
        self.started_ray = False
        self._done_shards: list[tuple[Path, int]] = []  # (shard, checkpoints when its last row was buffered)

    def execute(self) -> IndexSummary:
        try:
            summary = super().execute()
        finally:
            if self.started_ray:
                import_ray().shutdown()
        self.shards.clear()  # everything the shards held is committed
        return summary

    def _read(self, todo: list[FileEntry], known: frozenset[str]) -> Iterator[ReadResult]:
        reuse = self.shards.reusable(todo, known)
        send = [e for e in todo if e.path not in reuse]
        self.summary.from_shards, self.summary.sent_to_ray = len(reuse), len(send)
        blocks = self._blocks(send, known)
        rows: list[FileResult] = []
        shard: Path | None = None
        for entry in todo:
            if entry.path in reuse:
                got = self.shards.result(*reuse[entry.path])
            else:
                if not rows:
                    if shard is not None:
                        self._shard_done(shard)
                    got_block = next(blocks, None)
                    if got_block is None:
                        raise PixqueryError(f"the Ray workers returned no result for {entry.path}")
                    shard, rows = got_block
                got = rows.pop(0)
                if got.path != entry.path:
                    raise PixqueryError(f"the Ray workers returned {got.path} where {entry.path} was expected")
            if got.embedded and got.content_hash not in known and got.error is None:
                self.outputs[entry.path] = got
            yield got.read_result(entry)
        if shard is not None:
            self._shard_done(shard)

    def _shard_done(self, shard: Path) -> None:
        """Every row of ``shard`` has been handed to the run: write what is batched, and delete the shards
        that a checkpoint has committed since."""
        self._flush()
        now = self.writer.checkpoints
        self._done_shards.append((shard, now))
        committed = [s for s, at in self._done_shards if at < now]
        self.shards.remove(committed)
        self._done_shards = [(s, at) for s, at in self._done_shards if at >= now]

    def _blocks(self, send: list[FileEntry], known: frozenset[str]) -> Iterator[tuple[Path, list[FileResult]]]:
        """(shard file, rows) for each block the workers return, in the order of ``send``."""
        if not send:
            return
        self.started_ray = connect(self.options)
        ray = import_ray()
        size = self.ix.batch_size
        batches = -(-len(send) // size)
        plan = plan_actors([n["Resources"] for n in ray.nodes() if n.get("Alive")], self.options.actors,
                           self.use_gpu)
        plan = replace(plan, actors=min(plan.actors, batches))  # no more actors than batches
        self.summary.actors, self.summary.gpus_per_actor = plan.actors, plan.gpus
        items = [{"path": e.path, "size": e.size, "mtime": e.mtime} for e in send]
        ds = ray.data.from_items(items, override_num_blocks=min(batches, 10_000))
        ds = ds.map_batches(
            EmbedStage, batch_size=size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan.actors),
            fn_constructor_kwargs={"build_models": self.build_models, "known": HashSet(sorted(known)),
                                   "threads": plan.threads},
            num_cpus=plan.cpus, num_gpus=plan.gpus or None)
        ds.context.execution_options.preserve_order = True  # blocks come back in file order
        ds.context.enable_progress_bars = self.options.verbose
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for block in batches:
                if len(block["path"]) == 0:
                    continue
                if str(block["models"][0]) != self.shards.key:
                    raise EncoderMismatchError(
                        f"a Ray worker built other models than this process ({block['models'][0]} instead of "
                        f"{self.shards.key}): install the same pixquery and model weights on every node")
                yield self.shards.write(block), from_block(block)
        except PixqueryError:
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith("ray"):
                raise
            inner = _unwrap(exc)
            if inner is not None:
                raise inner from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PixqueryError(f"the Ray run failed: {first}") from exc
        finally:  # a run that stops early ends the dataset's execution too (its actors hold the cluster's CPUs)
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _embed(self, batch: list[tuple[ReadResult, int, ImageRow | None]]
               ) -> tuple[BatchOutput, np.ndarray, np.ndarray]:
        got = [self.outputs.pop(res.entry.path) for res, _, _ in batch]
        memories = [g.memory for g in got]
        out = BatchOutput(np.stack([g.vector for g in got]), [g.caption for g in got],
                          None if any(m is None for m in memories) else np.stack(memories),
                          classes=None if any(g.classes is None for g in got) else [g.classes for g in got],
                          confidence=[g.confidence for g in got])
        where = np.array([i for i, g in enumerate(got) if g.caption_vec is not None], dtype=np.int64)
        dim = got[0].vector.shape[0]
        cap_vecs = np.stack([got[i].caption_vec for i in where]) if len(where) else np.zeros((0, dim), np.float32)
        return out, where, cap_vecs


def index_on_ray(engine, root: str | Path, options: RayOptions = RayOptions(),  # noqa: ANN001 - indexer.engine.Engine
                 rebuild: bool = False, build_models: Callable[[], ImageModels] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> IndexSummary:
    """``Engine.index`` with the reader and model stages on Ray (see the module's docstring).

    ``build_models``: builds the model stage on each worker (default: the engine's configured models,
    with the encoder the index uses named explicitly); it must build models with the same fingerprints
    as the engine's (checked on every block).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    import_ray()  # clear messages before anything is touched
    check_reachable(options)
    config = engine.config
    shard_dir = config.index_dir / SHARD_DIR
    if rebuild:
        engine.drop()
        ShardStore(shard_dir, "").clear()
    writer = engine.writer()
    models = engine.models()
    if build_models is None:
        build_models = EngineModels(replace(config, encoder=models.encoder.info.name, progress=False))
    indexer = Indexer(writer.store, writer.vectors, models, batch_size=engine.batch_size, workers=engine.workers,
                      progress=config.progress, on_progress=on_progress)
    use_gpu = str(config.device).lower() != "cpu"
    return indexer.run(root, lambda ix, r: RayRun(ix, r, options, build_models, shard_dir, use_gpu))
