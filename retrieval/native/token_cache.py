"""Recent texts' token states, kept by the text towers (PyTorch's and onnxruntime's): a search embeds
its query, then the match head reads the same states, so the tower runs once per query."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

TOKEN_CACHE_SIZE = 64  # recent short texts whose token states are kept
CACHED_BATCH = 8  # a call of at most this many texts keeps each one's states (queries, not a batch of captions)


class TokenCache:
    """text -> (states (1, T, H), mask (1, T)) of its real tokens, least recently used dropped first.
    Holds torch tensors or numpy arrays alike."""

    def __init__(self, size: int = TOKEN_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, text: object) -> bool:
        return text in self._items

    def get(self, texts: list[str]) -> tuple[Any, Any] | None:
        """The states of a single text seen recently (None: not one text, or not kept)."""
        if len(texts) != 1:
            return None
        with self._lock:
            hit = self._items.get(texts[0])
            if hit is not None:
                self._items.move_to_end(texts[0])
            return hit

    def put(self, texts: list[str], hidden: Any, mask: Any) -> None:
        """Keep each text's states (hidden (B, T, H), mask (B, T)) trimmed to its real tokens, for a call of
        at most :data:`CACHED_BATCH` texts."""
        if len(texts) > CACHED_BATCH:
            return
        with self._lock:
            for i, text in enumerate(texts):
                n = int(mask[i].sum())
                self._items[text] = (hidden[i:i + 1, :n], mask[i:i + 1, :n])
                self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def prepared_states(token_states: Callable, texts: Sequence[str], batch: int, max_tokens: int,
                    copy: Callable[[Any], Any]) -> dict[str, tuple[Any, Any]]:
    """The token states of many texts (an evaluation's queries) from ``token_states(chunk, cache=False)``
    in batches of ``batch``: text -> (states (1, n, H), mask (1, n)) of its first ``max_tokens`` real
    tokens, each a ``copy``, so that the batch's arrays are freed."""
    out: dict[str, tuple[Any, Any]] = {}
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        states, mask = token_states(chunk, cache=False)
        for i, text in enumerate(chunk):
            n = min(int(mask[i].sum()), max_tokens)
            out[text] = (copy(states[i:i + 1, :n]), copy(mask[i:i + 1, :n]))
    return out


def memory_rows(memory: Any, width: int) -> int:
    """How many flat memories (N, ``width``) a match head is given to rate (0: nothing to do); ValueError
    for memories of another width (another scorer's)."""
    n = len(memory)
    if n and memory.shape[1] != width:
        raise ValueError(f"memories of width {memory.shape[1]}, the match head reads {width}")
    return n
