"""Groups of duplicate images: exact copies (same content hash) and near copies (similar image embeddings).

Exact copies collapse to one representative each; representatives whose embeddings are at least
``threshold`` similar are joined (union-find over the k-NN pairs), so a near group also lists the exact
copies of its members. Every image is in at most one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# (queries (B, D), k, allowed ids or None) -> (scores, ids), each (B, <=k)
SearchFn = Callable[[np.ndarray, int, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]
VectorsFn = Callable[[np.ndarray], np.ndarray]  # (B,) ids -> (B, D) stored vectors

SIMILARITY_EPS = 1e-5  # float32 cosines of identical vectors can read 0.99999994


@dataclass(frozen=True)
class DuplicateGroup:
    kind: str  # "exact": all the same bytes; "near": similar images (and their exact copies)
    ids: tuple[int, ...]  # ordered by path
    paths: tuple[str, ...]
    similarity: float  # exact: 1.0; near: the lowest similarity among the pairs that joined the group

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": len(self.ids), "similarity": round(self.similarity, 6),
                "ids": list(self.ids), "paths": list(self.paths)}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(ids: np.ndarray, exact: Sequence[Sequence[int]], vectors: VectorsFn, search: SearchFn,
                    paths: Callable[[list[int]], dict[int, str]], threshold: float = 0.95, k: int = 10,
                    batch_size: int = 1024) -> list[DuplicateGroup]:
    """All duplicate groups among the indexed ``ids``, biggest first, then most similar.

    exact: id groups that share a content hash (each of two or more ids); paths: ids -> {id: path}.
    Cost: one k-NN query per distinct image against the index (N queries against a flat index, O(N^2 D)
    work in all), run in batches of ``batch_size``: memory is O(batch_size * k) per batch plus the pairs
    found (at most N * k), never an N x N matrix.
    """
    ids = np.asarray(ids, dtype=np.int64)
    indexed = set(ids.tolist())
    copies: dict[int, list[int]] = {}  # representative (lowest id) -> all ids with its bytes
    for g in exact:
        group = sorted(int(i) for i in g if int(i) in indexed)
        if len(group) > 1:
            copies[group[0]] = group
    rep_of = {i: rep for rep, group in copies.items() for i in group}
    reps = np.array([i for i in ids.tolist() if rep_of.get(i, i) == i], dtype=np.int64)
    allowed = reps if len(reps) < len(ids) else None  # search representatives only: copies would fill the k slots

    uf = _UnionFind()
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(reps), batch_size):
        q_ids = reps[start:start + batch_size]
        scores, nbrs = search(vectors(q_ids), k + 1, allowed)  # +1: each image finds itself
        hit = (scores >= threshold - SIMILARITY_EPS) & (nbrs != q_ids[:, None]) & (nbrs >= 0)
        for row, col in zip(*np.nonzero(hit)):
            a, b, s = int(q_ids[row]), int(nbrs[row, col]), float(scores[row, col])
            uf.union(a, b)
            pairs.append((a, b, s))
    weakest: dict[int, float] = {}  # component root -> its least similar pair
    for a, _, s in pairs:
        root = uf.find(a)
        weakest[root] = min(weakest.get(root, 1.0), s)

    members: dict[int, list[int]] = {}
    for rep in reps.tolist():
        members.setdefault(uf.find(rep), []).append(rep)
    raw: list[tuple[str, list[int], float]] = []
    for root, group_reps in members.items():
        group = [i for rep in group_reps for i in copies.get(rep, [rep])]
        if len(group_reps) > 1:
            raw.append(("near", group, min(weakest[root], 1.0)))
        elif len(group) > 1:
            raw.append(("exact", group, 1.0))

    where = paths([i for _, group, _ in raw for i in group])
    groups = []
    for kind, group, sim in raw:
        ordered = sorted((where[i], i) for i in group if i in where)
        if len(ordered) > 1:
            groups.append(DuplicateGroup(kind, tuple(i for _, i in ordered), tuple(p for p, _ in ordered), sim))
    groups.sort(key=lambda g: (-len(g.ids), -g.similarity, g.paths[0]))
    return groups


def summarize(groups: Sequence[DuplicateGroup]) -> dict[str, int]:
    """Counts: groups and images in them, by kind; ``redundant`` = images beyond one per group."""
    out = {"groups": len(groups), "images": sum(len(g.ids) for g in groups)}
    for kind in ("exact", "near"):
        mine = [g for g in groups if g.kind == kind]
        out[f"{kind}_groups"], out[f"{kind}_images"] = len(mine), sum(len(g.ids) for g in mine)
    out["redundant"] = out["images"] - out["groups"]
    return out
