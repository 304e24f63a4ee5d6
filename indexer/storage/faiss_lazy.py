"""FAISS, imported on first use: indexing writes vector records only, so an indexing run needs no FAISS
(and pays nothing for a search structure it never searches); the first search, or the first approximate
structure a commit builds, imports it. ``faiss`` here is a stand-in whose attributes are FAISS's."""

from __future__ import annotations

from indexer.errors import InputError


def load_faiss():  # noqa: ANN201 - the faiss module
    """FAISS itself; a clear error where it is not installed."""
    try:
        import faiss as module
    except ImportError as exc:
        raise InputError("searching needs FAISS, which is not installed: pip install faiss-cpu "
                         "(or pixquery's 'gpu' extra for the GPU build)") from exc
    return module


class _Faiss:
    """Looks every attribute up on FAISS, imported at the first lookup."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(load_faiss(), name)


faiss = _Faiss()


def gpu_count() -> int:
    get = getattr(load_faiss(), "get_num_gpus", None)
    return int(get()) if get else 0
