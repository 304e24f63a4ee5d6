"""What the :class:`~indexer.engine.Engine` says about indexed images in words (a mixin, in its own file
to keep the composition root small): the tagger and the caption-confidence model built from the config,
``recaption`` and ``retag`` (captions, tags and confidence written again for indexed images), and the
captions, how sure they are, tags and alt text of indexed images.

Tags come from the native image tower's ImageNet classifier (retrieval/tagging.py); an index from before
tags keeps working without them, and ``pixquery retag`` adds them.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Sequence

from indexer import provenance
from indexer.errors import InputError
from indexer.search.describe import ImageDescription
from retrieval.encoder import GridEncoder
from retrieval.tagging import Tag, Tagger

if TYPE_CHECKING:
    from captioning.confidence import ConfidenceModel
    from indexer.storage.store import Store

RETAG_HINT = "add them with: pixquery retag"


class EngineTags:
    """Mixed into ``Engine``: uses its public config, encoder, store, writer, models and write lock."""

    def _init_tags(self, tagger: Tagger | None) -> None:
        self._tagger: Tagger | None = tagger
        self._tagger_checked = tagger is not None
        self._confidence: ConfidenceModel | None = None

    @property
    def tagger(self) -> Tagger | None:
        """The tagger (None: off, or the encoder is not the native one, whose tower it classifies).
        A class list or classifier that cannot be loaded raises here (exit 4)."""
        if not self._tagger_checked:
            self._tagger_checked = True
            encoder = self.encoder
            if self.config.tagger and isinstance(encoder, GridEncoder) and hasattr(encoder, "text_tower"):
                # the native encoder: its tower's classifier gives the tags, its text tower embeds queries
                from retrieval.device import resolve_device
                from retrieval.native.tagger import create_tagger

                self._tagger = create_tagger(self.config.tagger, text_tower=encoder.text_tower,
                                             device=resolve_device(self.config.device))
        return self._tagger

    @property
    def confidence_model(self) -> ConfidenceModel | None:
        """The model that rates captions (None: off, or no tagger to rate them with)."""
        if self._confidence is None and self.config.confidence and self.tagger is not None:
            from captioning.confidence import ConfidenceModel

            self._confidence = ConfidenceModel(self.config.confidence.removeprefix("native:"))
        return self._confidence

    def _index_tagger(self, store: Store) -> Tagger | None:
        """The tagger for ranking this index (None when the index has no tags: the tags signal is off)."""
        return self.tagger if store.get_meta("tagger") else None

    def recaption(self, stop: threading.Event | None = None) -> dict:
        """Caption every indexed image again with the configured captioner (image vectors untouched);
        the scorer's memories are written again too. An interrupted recaption (killed, or ``stop`` set)
        carries on where it stopped when run again with the same captioner.

        Returns counts: {"images", "captioned", "failed", "already_done", "interrupted"}; unreadable files
        keep their old caption.
        """
        if self.captioner is None:
            raise InputError("no captioner is configured (--captioner NAME)")
        self.store()
        with self.writing():
            writer = self.writer()
            from indexer.indexing.recaption import recaption  # the PyTorch models: not on a search's path

            counts = recaption(writer.store, writer.vectors, self.models(), batch_size=self.batch_size,
                               workers=self.workers, checkpoint_every=self.config.checkpoint_every,
                               progress=self.config.progress, stop=stop)
            if not counts.interrupted:
                writer.store.set_meta({"captioner": json.dumps(self.captioner.info.to_dict())})
        return counts.to_dict()

    def retag(self, everything: bool = False, stop: threading.Event | None = None) -> dict:
        """Tag the indexed images that lack the configured tagger's tags (``everything``: all of them),
        and rate the captions they have; captions and vectors untouched (what an index from before tags needs).

        Returns counts: {"images", "tagged", "rated", "failed"}; unreadable files keep what they had.
        """
        self.store()
        if self.tagger is None:
            raise InputError("no tagger: tags need the native encoder and a tagger (--tagger, PIXQUERY_TAGGER)")
        with self.writing():
            writer = self.writer()
            from indexer.indexing.retag import retag

            return retag(writer.store, writer.vectors, self.models(), batch_size=self.batch_size,
                         workers=self.workers, checkpoint_every=self.config.checkpoint_every,
                         progress=self.config.progress, everything=everything, stop=stop).to_dict()

    def describe(self, ids: Sequence[int] | None = None) -> list[ImageDescription]:
        """Caption, caption confidence, tags and alt text of images ``ids`` (None: every indexed image), in
        id order; what exports read (an uncertain caption is never alt text, see ImageDescription)."""
        store = self.store()
        rows = sorted((store.all_images() if ids is None else store.images_by_ids([int(i) for i in ids]).values()),
                      key=lambda r: r.id)
        tags = self.tags([r.id for r in rows])
        threshold = provenance.confidence_threshold(store)
        return [ImageDescription.of(r, tags.get(r.id), threshold) for r in rows]

    def caption_threshold(self) -> float | None:
        """From which confidence this index's captions count as sure (None: its captions were never rated)."""
        return provenance.confidence_threshold(self.store())

    def untagged(self) -> int:
        """How many indexed images have no tags yet (an index from before tags: ``pixquery retag`` adds them);
        0 where this configuration does not tag (no tagger, or an index not built by the native encoder,
        whose tower the tagger classifies). Builds no model."""
        built = self.index_info
        native = bool(self.config.tagger) and built is not None and built.name.startswith("native:")
        if self._tagger is None and not native:
            return 0
        return self.store().tag_counts()["untagged"]

    def tags(self, ids: Sequence[int]) -> dict[int, list[Tag]]:
        """{id: its tags, most likely first} of those ``ids`` that have any."""
        store = self.store()
        tagger = self._index_tagger(store)
        if tagger is None:
            return {}
        out = {}
        for i, cls in store.classes_by_ids(ids).items():
            found = tagger.tags(cls)
            if found:
                out[i] = found
        return out
