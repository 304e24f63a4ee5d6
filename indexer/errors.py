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


class AnnFileError(IndexCorruptError):
    """An approximate search structure's file is missing or damaged (its vectors are safe in the
    segments: a writer rebuilds it)."""


__all__ = ["AnnFileError", "InputError", "PixqueryError", "IndexNotFoundError", "EncoderMismatchError", "IndexCorruptError",
           "IndexBusyError", "DatabaseUnavailableError"]
