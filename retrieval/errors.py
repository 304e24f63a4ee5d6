"""Typed exceptions shared by every pixquery package.

Library code raises these; only the CLI and the UI turn them into messages and exit codes.
"""


class PixqueryError(Exception):
    """Base class of every error pixquery reports to a user."""

    exit_code = 1


class InputError(PixqueryError):
    """The user gave something unusable: a missing folder, an empty query, a bad option."""

    exit_code = 2


class ModelLoadError(PixqueryError):
    """A model could not be built or its weights could not be found or read."""

    exit_code = 4


class ImageDecodeError(PixqueryError):
    """A file could not be decoded as an image (corrupt, truncated, not an image)."""

    exit_code = 2
