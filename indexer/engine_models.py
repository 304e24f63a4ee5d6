"""Which models an :class:`~indexer.engine.Engine` uses (a mixin, in its own file to keep the composition
root small): the encoder, captioner, scorer and match head built from the config on first use, the model
stage of indexing, and the torch-free query models that answer text searches where they are ready
(indexer/query_models.py; exported after indexing).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from captioning.captioner import Captioner, TextScorer
from indexer import provenance, query_models
from indexer.errors import InputError, PixqueryError
from indexer.query_models import QueryModels
from retrieval.encoder import GridEncoder, JointEncoder

if TYPE_CHECKING:
    from indexer.indexing.models import ImageModels
    from retrieval.native.matcher import Matcher

log = logging.getLogger(__name__)


class EngineModels:
    """Mixed into ``Engine``: reads its config and public ``store()``, ``exists``, ``index_info``, ``tagger``
    and ``confidence_model``; keeps the built models in the attributes ``Engine.__init__`` sets."""

    def _device(self):  # noqa: ANN202 - torch.device
        from retrieval.device import resolve_device

        return resolve_device(self.config.device)

    @property
    def encoder(self) -> JointEncoder:
        if self._encoder is None:
            from retrieval.factory import create_encoder

            name = self.config.encoder
            if name is None:
                built = self.index_info if self.exists else None
                name = built.name if built else self.config.default_encoder
            self._encoder = create_encoder(name, device=self._device(), cache_dir=self.config.cache_dir / "models",
                                           offline=self.config.offline)
        return self._encoder

    def build_captioner(self, name: str) -> Captioner:
        """The captioner called ``name``, on this engine's device and cache (the one place captioners are built)."""
        from captioning.factory import create_captioner

        return create_captioner(name, device=self._device(), cache_dir=self.config.cache_dir / "models",
                                offline=self.config.offline)

    @property
    def captioner(self) -> Captioner | None:
        """The captioner for new images (None when captions are switched off). A native captioner beside
        the native encoder never loads its own tower: the model stage hands it the encoder's grid."""
        if self._captioner is None and self.config.captioner:
            self._captioner = self.build_captioner(self.config.captioner)
        return self._captioner

    @property
    def scorer(self) -> TextScorer | None:
        """The caption decoder whose memories the index stores and that rates query text against images,
        through its rater where one is configured and distilled from it (None: off, or the encoder has no grid)."""
        if self._scorer is None and self.config.scorer and isinstance(self.encoder, GridEncoder):
            scorer = self.build_captioner(self.config.scorer)
            if not isinstance(scorer, TextScorer):
                raise InputError(f"{self.config.scorer} cannot rate text against images; the scorer must be "
                                 f"a native captioner (or none)")
            if self.config.rater and hasattr(scorer, "use_rater"):  # may raise ModelLoadError: exit 4
                scorer.use_rater(self.config.rater.removeprefix("native:"))
            self._scorer = scorer
        return self._scorer

    @property
    def matcher(self) -> Matcher | None:
        """The match head beside the scorer (None: off, no scorer, or trained on another scorer's memories)."""
        if not self._matcher_checked and self.config.matcher and self.scorer is not None:
            from retrieval.native.matcher import Matcher

            encoder = self.encoder  # a scorer implies the native encoder, whose text tower (and cache) is shared
            matcher = Matcher(self.config.matcher, device=self._device(),  # may raise ModelLoadError: exit 4
                              text_tower=getattr(encoder, "text_tower", None))
            self._matcher_checked = True
            self._matcher = matcher if provenance.matcher_fits(matcher, self.scorer) else None
        return self._matcher

    @property
    def batch_size(self) -> int:
        """Images per model batch (EngineConfig.batch_size_for: 256 on a GPU, 32 on a CPU unless set)."""
        return self.config.batch_size_for(self._device())

    @property
    def workers(self) -> int:
        """Decoding threads or processes (EngineConfig.workers_for)."""
        return self.config.workers_for(self._device())

    @property
    def read_processes(self) -> bool:
        """Whether indexing decodes on worker processes rather than threads (EngineConfig.processes_for)."""
        return self.config.processes_for(self._device())

    def models(self) -> ImageModels:
        """The model stage of indexing: encoder, captioner, scorer, tagger and confidence, one call per batch."""
        from indexer.indexing.models import ImageModels

        return ImageModels(self.encoder, self.captioner, self.config.decode, self.scorer, self.tagger,
                           self.confidence_model)

    def prepare_fast_queries(self) -> list[str]:
        """Export the torch-free query models where they are missing (indexer/query_models.py) -> parts made."""
        if self._injected or not query_models.allowed(self.config, exporting=True):
            return []
        try:
            return query_models.prepare(self.config.cache_dir, self.encoder, self.scorer, self.matcher, self.tagger)
        except (PixqueryError, OSError) as exc:
            log.warning("text searches will load PyTorch: the query models could not be exported (%s)", exc)
            return []

    def _lite_models(self) -> QueryModels | None:
        """The torch-free models for text queries where they are ready (None: use the PyTorch ones)."""
        if not self._lite_checked:
            self._lite_checked = True
            if not self._injected:
                built = provenance.built_with(self.store())
                self._lite = query_models.load(self.config, built, lambda: self.encoder)
        return self._lite

    def query_runtime(self) -> str:
        """What answers text queries on this index: ``onnxruntime`` (the torch-free exports) or ``pytorch``."""
        return "onnxruntime" if self._lite_models() is not None else "pytorch"
