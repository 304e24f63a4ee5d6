"""The native query side without torch: MiniLM, the text projection, the match head and the tagger's
query scoring on onnxruntime and numpy, from files that ``retrieval/native/query_export.py`` wrote.

A ``pixquery search "..."`` process uses these (``indexer/query_models.py`` decides): it answers a text
query without importing torch, whose import alone takes 1.5-2 s on a small machine. Results agree with
the PyTorch models within float32 rounding (tests/test_lite_query.py bounds the differences). What only
the image side can do (embedding an example image) is handed to the full encoder, built on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from retrieval.encoder import EncoderInfo, JointEncoder
from retrieval.errors import ModelLoadError
from retrieval.native.class_tags import ClassTagger, TagCalibration, checked_classes
from retrieval.native.ort import model_file, session
from retrieval.native.token_cache import TokenCache, memory_rows, prepared_states
from retrieval.tagging import Classes, TaggerInfo


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class LiteText:
    """MiniLM on onnxruntime: texts -> last-layer token states, with a cache of recent single queries."""

    def __init__(self, folder: Path, spec: dict, threads: int) -> None:
        from tokenizers import Tokenizer

        try:
            self.session = session(folder / "minilm.onnx", threads)
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - a damaged export: the caller falls back to PyTorch
            raise ModelLoadError(f"cannot load the exported text tower in {folder}: {exc}") from exc
        self.tokenizer.enable_truncation(max_length=int(spec["max_length"]))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        self._cache = TokenCache()

    def token_states(self, texts: list[str], cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """-> token states (B, T, 384) float32 and attention mask (B, T) int64 (as the PyTorch tower's)."""
        hit = self._cache.get(texts) if cache else None
        if hit is not None:
            return hit
        batch = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
        hidden = self.session.run(["hidden"], {"ids": ids, "mask": mask})[0]
        if cache:
            self._cache.put(texts, hidden, mask)
        return hidden, mask

    @staticmethod
    def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean of the real tokens' states -> (B, 384)."""
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)

    def pooled(self, texts: list[str], cache: bool = True) -> np.ndarray:
        return self.pool(*self.token_states(texts, cache))


class LiteTextEncoder(JointEncoder):
    """The native encoder's text side on onnxruntime. ``full()``: the complete encoder (PyTorch), built
    the first time an image has to be embedded (a search by example image)."""

    device = "cpu"

    def __init__(self, text: LiteText, folder: Path, spec: dict, full: Callable[[], JointEncoder]) -> None:
        self.text, self._full = text, full
        self.info = EncoderInfo(**spec["encoder"])
        head = np.load(folder / "text_head.npz")
        self.weight, self.bias = head["weight"].astype(np.float32), head["bias"].astype(np.float32)
        self.members, self.embed_dim = int(spec["members"]), int(spec["embed_dim"])

    def encode_text_features(self, pooled: np.ndarray) -> np.ndarray:
        """(B, 384) mean-pooled MiniLM states -> (B, dim) embeddings (``Heads.embed_text``)."""
        y = _unit(pooled) @ self.weight.T + self.bias  # (B, M * D)
        y = _unit(y.reshape(len(y), self.members, self.embed_dim)).reshape(len(y), -1) / np.sqrt(self.members)
        return _unit(y)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_text_features(self.text.pooled(list(texts)))

    def encode_texts_pooled(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pooled = self.text.pooled(list(texts))
        return self.encode_text_features(pooled), _unit(pooled)

    # --- the image side: the full encoder ------------------------------------------------------------
    def preprocess(self, image):  # noqa: ANN001, ANN201 - PIL image -> torch tensor
        return self._full().preprocess(image)

    def encode_pixels(self, pixels):  # noqa: ANN001, ANN201
        return self._full().encode_pixels(pixels)

    def encode_images(self, images):  # noqa: ANN001, ANN201
        return self._full().encode_images(images)


class LiteMatcher:
    """The match head on onnxruntime (``retrieval/native/matcher.py``'s :class:`Matcher`, same contract)."""

    def __init__(self, text: LiteText, folder: Path, spec: dict, threads: int, precision: str = "int8") -> None:
        self.text = text
        try:
            self.session = session(model_file(folder, spec, "matcher.onnx", precision), threads)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load the exported match head in {folder}: {exc}") from exc
        self.name, self.sha256, self.scorer_sha256 = spec["name"], spec["sha256"], spec["scorer_sha256"]
        self.memory_len, self.width, self.max_tokens = int(spec["memory_len"]), int(spec["memory_dim"]), \
            int(spec["max_tokens"])
        self._prepared: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def memory_dim(self) -> int:
        return self.memory_len * self.width

    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:
        """Token states of many texts at once (an evaluation's queries), for later :meth:`score` calls."""
        self._prepared = prepared_states(self.text.token_states, texts, batch, self.max_tokens, np.copy)

    def score(self, memory: np.ndarray, text: str) -> np.ndarray:
        """Match logits of ``text`` against N images' flat memories (N, S * D) -> (N,)."""
        n = memory_rows(memory, self.memory_dim)
        if not n:
            return np.zeros(0, dtype=np.float32)
        found = self._prepared.get(text)
        tokens, mask = found if found is not None else self.text.token_states([text])
        tokens, mask = tokens[:, :self.max_tokens], mask[:, :self.max_tokens].astype(bool)
        feed = {"tokens": np.ascontiguousarray(tokens, dtype=np.float32), "mask": np.ascontiguousarray(mask),
                "memory": np.asarray(memory, dtype=np.float32).reshape(n, self.memory_len, self.width)}  # (1, T): once
        return self.session.run(["logit"], feed)[0]


class LiteTagger(ClassTagger):
    """The tagger's reading and query side (tags, zero-shot scores, gate) with MiniLM on onnxruntime.
    It cannot classify images: indexing uses the PyTorch tagger."""

    def __init__(self, text: LiteText, folder: Path, spec: dict) -> None:
        embeddings = np.load(folder / "tagger.npz")["embeddings"]
        classes = checked_classes(folder, spec["classes_sha256"], embeddings.shape[0])
        super().__init__(TagCalibration(**spec["calibration"]), embeddings, classes, TaggerInfo(**spec["info"]))
        self.text = text

    def _embed(self, texts: list[str], cache: bool = True) -> np.ndarray:
        return _unit(self.text.pooled(texts, cache))

    def classify_grid(self, grid) -> list[Classes]:  # noqa: ANN001
        raise ModelLoadError("the torch-free tagger only reads tags; tagging images needs the PyTorch tagger")
