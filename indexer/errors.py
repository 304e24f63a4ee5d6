"""Errors of the index layer (all are :class:`retrieval.errors.PixqueryError`)."""

from retrieval.errors import InputError, PixqueryError


class IndexNotFoundError(PixqueryError):
    """There is no index at the configured location yet."""

    exit_code = 3


class EncoderMismatchError(PixqueryError):
    """The index was built with a different encoder than the one asked for."""

    exit_code = 3


class IndexCorruptError(PixqueryError):
    """The index files exist but cannot be read or disagree with each other beyond repair."""

    exit_code = 1


class IndexBusyError(PixqueryError):
    """Another process is writing this index (it holds the index's write lock)."""

    exit_code = 5


class DatabaseUnavailableError(PixqueryError):
    """The index's database server cannot be reached (down, wrong address, refused credentials)."""

    exit_code = 1


__all__ = ["InputError", "PixqueryError", "IndexNotFoundError", "EncoderMismatchError", "IndexCorruptError",
           "IndexBusyError", "DatabaseUnavailableError"]
