"""Fused ranking's second stage: the scorer's log-likelihood of the query and the match head's logit, for the
few best candidates of the first stage, read off the stored decoder memories.

On more than one core it starts early (:meth:`SecondStage.start`): as soon as the image search knows its
best ``depth`` candidates (before it re-ranks the rest of the pool's short list), those (the first stage's
best are mostly among them) are shared out among the side threads (indexer/search/side.py), each reading
its share's memories and scoring them, while the main thread finishes the search and computes the pool's
signals. :meth:`SecondStage.finish` then hands the candidates the early start missed to the side threads
too, runs, on the main thread, the match head for the first stage's best (from the memories the side
threads read), and offers the caller's ``meanwhile`` work to the side threads (one that is done with the
scorer runs it; otherwise the main thread does, after the match head); then it collects the side threads'
results. On one core everything runs in order on the caller's thread.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from indexer.search.side import Offer, beside, parallel, side_workers
from retrieval.query import SECOND_STAGE

if TYPE_CHECKING:  # models are built by the Engine; ranking only calls them
    from captioning.captioner import TextScorer
    from indexer.storage.vectors import MemoryStore
    from retrieval.native.matcher import Matcher


class SecondStage:
    """The second-stage signals over one index's stored ``memories`` (``scorer``, ``matcher``: None where off)."""

    def __init__(self, memories: MemoryStore | None, scorer: TextScorer | None, matcher: Matcher | None) -> None:
        self.memories, self.scorer, self.matcher = memories, scorer, matcher

    def signals(self, ids: np.ndarray, text: str, likelihood: bool = True, match: bool = True) -> dict[str, np.ndarray]:
        """The second-stage signals asked for and available, from one read of the stored memories:
        {"likelihood": log P(text | image), "match": the match head's logit}, each (len(ids),), NaN
        where an image has no stored memory."""
        wanted = self.wanted(likelihood, match)
        if not wanted or not len(ids):
            return {name: np.full(len(ids), np.nan) for name in wanted}
        have, mem = self.memories.reconstruct_present(ids)  # (m, S * D_dec)
        return self.rate(have, mem, text, likelihood, match)

    def wanted(self, likelihood: bool, match: bool) -> list[str]:
        return [name for name, on, model in zip(SECOND_STAGE, (likelihood, match), (self.scorer, self.matcher))
                if on and model is not None]

    def rate(self, have: np.ndarray, mem: np.ndarray, text: str, likelihood: bool,
             match: bool) -> dict[str, np.ndarray]:
        """:meth:`signals` from memories already read: ``have`` (n,) which images have one, ``mem`` their
        (have.sum(), S * D_dec) memories."""
        out = {name: np.full(len(have), np.nan) for name in self.wanted(likelihood, match)}
        if have.any():
            if "likelihood" in out:
                out["likelihood"][have] = self.scorer.log_likelihood(mem, text)
            if "match" in out:
                out["match"][have] = self.matcher.score(mem, text)
        return out

    def start(self, best: Sequence[int] | np.ndarray, text: str, depth: int, likelihood: bool) -> Early | None:
        """The scorer started early for the image search's ``best`` ids (best first; the first ``depth``), shared
        out among the side threads (see module doc). None on a single core, where it would only add work, when
        no likelihood is wanted, or without candidates."""
        if not self.starts_early(likelihood) or not len(best):
            return None
        ids = np.asarray(list(best)[:depth], dtype=np.int64)
        shares = [share for share in np.array_split(ids, max(1, min(side_workers(), len(ids)))) if len(share)]
        read: list[Future] = [Future() for _ in shares]  # each share's memories, read on its side thread
        jobs = [beside(self._score_share, share, text, ready) for share, ready in zip(shares, read)]
        return Early(ids, read, jobs)

    @staticmethod
    def starts_early(likelihood: bool) -> bool:
        """Whether :meth:`start` starts anything: on more than one core, when the likelihood is wanted."""
        return likelihood and parallel()

    def _score_share(self, ids: np.ndarray, text: str, read: Future) -> np.ndarray:
        """The scorer's log-likelihoods of ``text`` for those of ``ids`` that have a memory; the memories
        read are handed out through ``read`` ((have (n,), memories)) first, for the match head."""
        try:
            have, mem = self.memories.reconstruct_present(ids)
        except BaseException as exc:
            read.set_exception(exc)
            raise
        read.set_result((have, mem))
        return self.scorer.log_likelihood(mem, text)

    def finish(self, ids: np.ndarray, text: str, likelihood: bool, match: bool, early: Early | None,
               meanwhile: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
        """:meth:`signals` of ``ids``, using what the ``early`` start read and rated: the match head rates
        ``ids`` here while the side threads finish the scorer and then rate the candidates the early start did
        not have; ``meanwhile()`` runs on a side thread that is free before the match head is done, or else
        here after it, and before the side threads' results are collected."""
        if early is None:
            out = self.signals(ids, text, likelihood, match)
            if meanwhile is not None:
                meanwhile()
            return out
        early_have, early_mem, early_jobs = early.collect()
        row_of = dict(zip(early.ids[early_have].tolist(), range(len(early_mem))))  # id -> row of early_mem
        started = set(early.ids.tolist())
        rest = np.array([i for i in ids.tolist() if i not in started], dtype=np.int64)
        have_rest, mem_rest = self.memories.reconstruct_present(rest)
        row_of |= dict(zip(rest[have_rest].tolist(), range(len(early_mem), len(early_mem) + len(mem_rest))))
        mem = np.concatenate([early_mem, mem_rest]) if len(mem_rest) else early_mem
        have = np.array([i in row_of for i in ids.tolist()], dtype=bool)
        rows = np.array([row_of[i] for i in ids[have].tolist()], dtype=np.int64)
        # the candidates the early start missed go to a side thread too (behind the early shares where every
        # side thread is busy): this thread keeps the match head
        late = beside(self.scorer.log_likelihood, mem_rest, text) if len(mem_rest) else None
        # ``meanwhile`` is offered to the side threads behind the scorer: one that is done with it runs it while
        # this thread runs the match head; if none is free by then, this thread takes it back and runs it
        offered = Offer(meanwhile) if meanwhile is not None else None
        out = self.rate(have, mem[rows], text, False, match)  # the match head, on this thread
        if offered is not None:
            offered.result()
        values = np.full(len(mem), np.nan)  # the scorer's (an early start means it was asked for)
        for share, job in early_jobs:
            values[share] = job.result()
        if late is not None:
            values[len(early_mem):] = late.result()
        out["likelihood"] = np.full(len(ids), np.nan)
        out["likelihood"][have] = values[rows]
        return out


@dataclass
class Early:
    """What :meth:`SecondStage.start` started: the image search's best ``ids``, cut into consecutive shares, and
    for each share the Future of its memories (``read``: (have, memories)) and of its log-likelihoods (``jobs``)."""

    ids: np.ndarray
    read: list[Future]
    jobs: list[Future]

    def collect(self) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, Future]]]:
        """-> (which of :attr:`ids` have a memory, those memories (a row each), the jobs as (their rows of
        those memories, the Future of their log-likelihoods)), once every share's memories are read."""
        shares = [ready.result() for ready in self.read]
        have = np.concatenate([h for h, _ in shares])
        mem = np.concatenate([m for _, m in shares])
        ends = np.cumsum([len(m) for _, m in shares])
        return have, mem, [(np.arange(end - len(m), end), job) for (_, m), end, job in zip(shares, ends, self.jobs)]
