"""A native captioner's scorer without torch: log P(text | image) from stored memories on onnxruntime,
exported by ``captioning/export.py``. A text search uses it for the ``likelihood`` signal
(``indexer/query_models.py`` decides). The float32 graph agrees with the float32 PyTorch scorer within
rounding; the 8-bit one (the default) within about 1 %, at about half the time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from captioning.captioner import CaptionerInfo, TextScorer
from captioning.tokenizer import WordTokenizer
from retrieval.errors import ModelLoadError
from retrieval.native.ort import model_file, session


class LiteScorer(TextScorer):
    """Rates texts against stored memories (same contract as :meth:`NativeCaptioner.log_likelihood`);
    it cannot make memories (indexing uses the PyTorch captioner)."""

    def __init__(self, folder: Path, spec: dict, threads: int, precision: str = "int8") -> None:
        try:
            self.session = session(model_file(folder, spec, "scorer.onnx", precision), threads)
            self.tokenizer = WordTokenizer.from_dict(json.loads((folder / "scorer_vocab.json").read_text()))
        except Exception as exc:  # noqa: BLE001 - a damaged export: the caller falls back to PyTorch
            raise ModelLoadError(f"cannot load the exported scorer in {folder}: {exc}") from exc
        self.info = CaptionerInfo(**spec["info"])  # the scorer whose memories are rated
        self.rater_info = CaptionerInfo(**spec["rater"]) if spec.get("rater") else None  # what rates them
        self._shape = (int(spec["memory_shape"][0]), int(spec["memory_shape"][1]))
        self.max_len = int(spec["max_len"])

    @property
    def memory_shape(self) -> tuple[int, int]:
        return self._shape

    def memory(self, grid) -> np.ndarray:  # noqa: ANN001
        raise ModelLoadError("the torch-free scorer only rates texts; memories are made by the PyTorch captioner")

    def log_likelihood(self, memory: np.ndarray, texts: str | Sequence[str]) -> np.ndarray:
        n, texts = len(memory), self.texts_for(memory, texts)
        if not n:
            return np.zeros(0, dtype=np.float32)
        same = len(set(texts)) == 1  # one text for every memory (a search): the graph takes its tokens once
        rows, empty = self.tokenizer.scoring_rows(texts[:1] if same else texts, self.max_len)
        mem = np.asarray(memory, dtype=np.float32).reshape(n, *self._shape)
        out = self.session.run(["log_likelihood"], {"memory": mem, "tokens": np.array(rows, dtype=np.int64)})[0]
        out[np.array(empty * n if same else empty)] = 0.0
        return out
