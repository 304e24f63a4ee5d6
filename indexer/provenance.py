"""Which models an index was built with, and whether the models configured now may use it.

Every index records its encoder (name, weights sha256, dimension, normalisation), the captioner of
its captions and the scorer whose decoder memories it stores (``meta`` table). Searching or indexing
with another encoder is refused; a new scorer makes the stored memories useless, so they are dropped
(and ``recaption`` writes them again); a match head is used only beside the scorer it was trained on.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from captioning.captioner import CaptionerInfo, TextScorer
from indexer.errors import EncoderMismatchError
from indexer.storage.bundle import VectorBundle
from indexer.storage.store import Store, WriteBatch
from retrieval.encoder import EncoderInfo

if TYPE_CHECKING:
    from retrieval.native.matcher import Matcher

log = logging.getLogger(__name__)


def built_with(store: Store) -> EncoderInfo | None:
    """The encoder that built this index (None for a new, empty one)."""
    raw = store.get_meta("encoder")
    return EncoderInfo(**json.loads(raw)) if raw else None


def check_encoder(store: Store, asked: str | None, encoder: Callable[[], EncoderInfo], loaded: bool) -> None:
    """Refuse an encoder other than the index's own. ``asked``: the name configured (None: the index's
    own); ``encoder()``: the info of the encoder to use (builds it); ``loaded``: it was injected."""
    built = built_with(store)
    if built is None:
        return
    if asked is not None and asked != built.name and not loaded:
        raise EncoderMismatchError(
            f"this index was built with encoder {built.name!r}, not {asked!r}; "
            f"search without --encoder, use another --db, or rebuild with: pixquery index FOLDER --rebuild "
            f"--encoder {asked}"
        )
    mine = encoder()
    if mine.fingerprint != built.fingerprint:
        raise EncoderMismatchError(
            f"this index was built with {built.fingerprint}, but the encoder now is {mine.fingerprint}; "
            f"its vectors are not comparable. Rebuild with: pixquery index FOLDER --rebuild"
        )


def record_models(encoder: EncoderInfo, captioner: CaptionerInfo | None, store: Store) -> dict[str, str]:
    """The meta facts an indexing run records: the encoder of a new index, and the captioner in use."""
    meta = {}
    if store.get_meta("encoder") is None:
        meta["encoder"] = json.dumps(encoder.to_dict())
    if captioner is not None:
        meta["captioner"] = json.dumps(captioner.to_dict())
    return meta


def scorer_matches(store: Store, scorer: TextScorer | None) -> bool:
    """Whether the stored memories were written by ``scorer``."""
    raw = store.get_meta("scorer")
    return scorer is not None and raw is not None and json.loads(raw)["fingerprint"] == scorer.info.fingerprint


def adopt_scorer(store: Store, vectors: VectorBundle, scorer: TextScorer | None) -> None:
    """Before memories are written: another scorer's are dropped, and ``scorer`` is recorded, in one commit."""
    if scorer is None or vectors.memories is None or scorer_matches(store, scorer):
        return
    if len(vectors.memories):
        log.warning("the scorer changed; dropping %d stored memories (run pixquery recaption to refill them)",
                    len(vectors.memories))
        vectors.drop_memories()
    meta = {"scorer": json.dumps({**scorer.info.to_dict(), "fingerprint": scorer.info.fingerprint})}
    vectors.commit(store, WriteBatch(meta=meta))


def matcher_fits(matcher: Matcher, scorer: TextScorer) -> bool:
    """Whether ``matcher`` was trained on ``scorer``'s memories (else fused ranking runs without it)."""
    fits = matcher.scorer_sha256 == scorer.info.weights_sha256 and \
        matcher.memory_dim == int(np.prod(scorer.memory_shape))
    if not fits:
        log.warning("the match head %s was trained on the memories of another scorer than %s; "
                    "fused ranking runs without it", matcher.name, scorer.info.name)
    return fits


def record_tagging(tagger, confidence) -> dict[str, str]:  # noqa: ANN001 - Tagger, ConfidenceModel (or None)
    """The meta facts of tags and caption confidence written from now on (the tagger; the confidence
    model and its threshold, which reading uses to mark captions sure or uncertain)."""
    meta = {}
    if tagger is not None:
        meta["tagger"] = json.dumps({**tagger.info.to_dict(), "fingerprint": tagger.info.fingerprint})
    if confidence is not None:
        meta["confidence"] = json.dumps({**confidence.info.to_dict(), "threshold": confidence.threshold})
    return meta


def confidence_threshold(store: Store) -> float | None:
    """From which confidence the index's captions count as sure (None: its captions were never rated)."""
    raw = store.get_meta("confidence")
    return float(json.loads(raw)["threshold"]) if raw else None
