"""Small JPEG copies of indexed images: shared with the HTTP API, so they live in ``indexer/thumbnails.py``
(nothing may import ``ui/``); re-exported here for the app's pages."""

from indexer.thumbnails import (  # noqa: F401
    PREVIEW_SIZE, THUMB_ASPECT, THUMB_SIZE, make_thumbnail, thumbnail, thumbnail_path,
)
