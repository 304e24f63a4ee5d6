"""Realistic synthetic vectors for the large benchmarks: real Flickr8k embeddings, perturbed and mixed.

Random Gaussian vectors are the worst case for an approximate index (no structure, every point about as
far from every other) and say nothing about real collections. The benchmarks that need more images
than there are (``bench ann``, ``bench latency``) build them from the native encoder's embeddings of
the Flickr8k images and captions instead:

* the *bases*: every Flickr8k image (train and dev), its image embedding, its five captions (texts and
  text embeddings) and the scorer's decoder memory (8-bit codes), computed once through the feature
  caches of ``retrieval/native/training/features.py`` and kept in ``<cache>/bench/``;
* a synthetic image ``r`` mixes two bases ``i`` and ``j`` (weights ``w`` ~ U(0.5, 1) and ``1 - w``)
  and adds Gaussian noise of norm about ``NOISE``; its caption vector mixes one caption embedding of
  each the same way (so image and caption vectors stay paired as in a real index); its caption text
  and memory are base ``i``'s;
* the queries are real caption embeddings (the dev images' captions), as a user's text query is.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from indexer.errors import InputError

log = logging.getLogger(__name__)

NOISE = 0.25  # norm of the noise added to a mixed vector (before normalising), against unit bases


@dataclass
class Bases:
    """Real embeddings that synthetic rows are made from (all rows unit length)."""

    images: np.ndarray  # (M, D) image embeddings
    captions: np.ndarray  # (C, D) caption embeddings
    owner: np.ndarray  # (C,) the image each caption describes (index into images)
    texts: list[str]  # (C,) the captions
    queries: np.ndarray  # indices into captions of the query captions (those of the dev images)
    memory_codes: np.ndarray | None = None  # (M, code size) uint8 scorer memories of the images
    source: str = "flickr8k"

    @property
    def dim(self) -> int:
        return int(self.images.shape[1])

    def query_vectors(self, n: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
        """``n`` real caption embeddings (and their texts) to use as queries, without repeats while they last."""
        rng = np.random.default_rng(seed)
        pick = rng.permutation(self.queries)[:n]
        if len(pick) < n:
            pick = np.concatenate([pick, rng.choice(self.queries, n - len(pick))])
        return self.captions[pick], [self.texts[i] for i in pick.tolist()]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


def project(bases: Bases, dim: int, seed: int = 0) -> Bases:
    """The same bases in ``dim`` dimensions (a random orthogonal map; identity when ``dim`` is theirs):
    for benchmarks at other encoders' sizes. Memories are left out."""
    if dim == bases.dim:
        return bases
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim, bases.dim), max(dim, bases.dim))))
    m = q[:bases.dim, :dim].astype(np.float32)  # (D, dim): orthonormal rows when dim >= D, columns otherwise
    return Bases(_unit(bases.images @ m), _unit(bases.captions @ m), bases.owner, bases.texts, bases.queries,
                 None, f"{bases.source} projected to {dim}-d")


_ADJ = "black white brown red blue young little small large happy wet muddy fluffy tall old".split()
_NOUN = ("dog man woman boy girl child people crowd surfer skier cyclist cat horse bird player "
         "couple family puppy biker climber").split()
_VERB = ("running jumping sitting standing walking playing riding swimming climbing looking smiling "
         "skiing surfing resting lying").split()
_PREP = "on in near through across under beside over along into".split()
_PLACE = ("grass beach water snow street field park bench road rock wall pool sand river hill "
          "mountain building crowd stage court").split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda words: np.asarray(words)[rng.integers(len(words), size=n)]  # noqa: E731
    parts = zip(pick(_ADJ), pick(_NOUN), pick(_VERB), pick(_PREP), pick(_ADJ), pick(_PLACE))
    return [f"a {a} {n_} is {v} {p} the {a2} {pl}" for a, n_, v, p, a2, pl in parts]


def gaussian_bases(dim: int, n_images: int = 2000, seed: int = 0, memory_code: int | None = None) -> Bases:
    """Random bases (unit Gaussian vectors, made-up captions): for tests and machines without Flickr8k.
    Only the benchmarks' plumbing is realistic with these, not the vectors."""
    rng = np.random.default_rng(seed)
    images = _unit(rng.standard_normal((n_images, dim)).astype(np.float32))
    owner = np.repeat(np.arange(n_images), 2)
    captions = _unit(images[owner] + 0.8 * _unit(rng.standard_normal((len(owner), dim)).astype(np.float32)))
    codes = rng.integers(64, 192, (n_images, memory_code), dtype=np.uint8) if memory_code else None
    return Bases(images, captions, owner, synthetic_captions(len(owner), seed), np.arange(len(owner)), codes,
                 "gaussian")


def mixed_rows(bases: Bases, n: int, seed: int = 0, chunk: int = 50_000, start_id: int = 1
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]]:
    """Chunks of ``n`` synthetic images made from ``bases``: (ids, image vectors, caption vectors, base
    index of each row (its caption text and memory), caption texts); ids ``start_id`` .. ``start_id + n - 1``."""
    rng = np.random.default_rng(seed)
    m, dim = len(bases.images), bases.dim
    per_image = np.bincount(bases.owner, minlength=m)
    first = np.concatenate([[0], np.cumsum(per_image)[:-1]])  # captions are grouped by owner (see load)
    for lo in range(0, n, chunk):
        size = min(chunk, n - lo)
        i = rng.integers(m, size=size)
        j = rng.integers(m, size=size)
        w = rng.uniform(0.5, 1.0, size=(size, 1)).astype(np.float32)
        noise = lambda: rng.standard_normal((size, dim), dtype=np.float32) * (NOISE / np.sqrt(dim))  # noqa: E731
        image = _unit(w * bases.images[i] + (1 - w) * bases.images[j] + noise())
        ci = first[i] + rng.integers(0, 1 << 30, size) % per_image[i]
        cj = first[j] + rng.integers(0, 1 << 30, size) % per_image[j]
        caption = _unit(w * bases.captions[ci] + (1 - w) * bases.captions[cj] + noise())
        ids = np.arange(start_id + lo, start_id + lo + size, dtype=np.int64)
        yield ids, image, caption, i, [bases.texts[c] for c in ci.tolist()]


# --- the Flickr8k bases -------------------------------------------------------------------------------
def _cache_file(cache_dir: Path, data: Path, encoder_fp: str, scorer_fp: str | None) -> Path:
    key = hashlib.sha256(f"{data.resolve()}|{encoder_fp}|{scorer_fp}".encode()).hexdigest()[:16]
    return cache_dir / "bench" / f"flickr8k-bases-{key}.npz"


def flickr8k_bases(data: Path, engine, batch_size: int = 64) -> Bases:  # noqa: ANN001 - an indexer Engine
    """The bases from the Flickr8k folder ``data`` (``images/``, ``captions.tsv``, ``train.txt``,
    ``dev.txt``) under ``engine``'s native encoder (and its scorer's memories when it has one); computed
    once (minutes on a CPU) and cached under the engine's cache folder."""
    import torch

    from retrieval.encoder import GridEncoder
    from retrieval.native.training.data import load_flickr8k
    from retrieval.native.training.features import grid_features, text_features

    data = Path(data).expanduser()
    encoder, scorer = engine.encoder, engine.scorer
    if not isinstance(encoder, GridEncoder) or not hasattr(encoder, "text_tower"):
        raise InputError(f"realistic benchmark vectors need the native encoder, not {encoder.info.name}")
    cache = _cache_file(engine.config.cache_dir, data, encoder.info.fingerprint,
                        scorer.info.fingerprint if scorer is not None else None)
    if cache.exists():
        return _load(cache)
    train, dev = load_flickr8k(data, "train"), load_flickr8k(data, "dev")
    paths = train.paths + dev.paths
    captions = train.captions + dev.captions
    features = engine.config.cache_dir / "features"
    device = torch.device("cpu")
    grid = grid_features(paths, features, device, tower=encoder.image_tower)  # (M, 1280, 7, 7) float16
    images, codes = [], []
    codec = None
    if scorer is not None:
        from indexer.storage.vectors import memory_codec

        codec = memory_codec(int(np.prod(scorer.memory_shape)))
    with torch.inference_mode():
        for lo in range(0, len(paths), batch_size):
            g = torch.from_numpy(np.asarray(grid[lo:lo + batch_size], dtype=np.float32))
            images.append(encoder.encode_grid(g))
            if codec is not None:
                codes.append(codec.compute_codes(np.ascontiguousarray(scorer.memory(g), dtype=np.float32)))
    texts = [c for caps in captions for c in caps]
    owner = np.repeat(np.arange(len(paths)), [len(c) for c in captions])
    feats = text_features(texts, features, device, tower=encoder.text_tower)  # (C, 384) float32
    cap_vecs = np.concatenate([encoder.encode_text_features(torch.from_numpy(feats[lo:lo + 1024]))
                               for lo in range(0, len(feats), 1024)])
    queries = np.flatnonzero(owner >= len(train.paths))
    bases = Bases(np.concatenate(images), cap_vecs, owner, texts, queries,
                  np.concatenate(codes) if codes else None)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    arrays = {"images": bases.images, "captions": bases.captions, "owner": bases.owner,
              "texts": np.array(texts), "queries": queries}
    if bases.memory_codes is not None:
        arrays["memory_codes"] = bases.memory_codes
    np.savez(tmp, **arrays)
    tmp.replace(cache)
    return bases


def _load(path: Path) -> Bases:
    with np.load(path, allow_pickle=False) as z:
        return Bases(z["images"], z["captions"], z["owner"], z["texts"].tolist(), z["queries"],
                     z["memory_codes"] if "memory_codes" in z.files else None)
