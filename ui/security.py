"""What the app lets through from the browser: shared with the HTTP API, so it lives in ``indexer/media.py``
(nothing may import ``ui/``); re-exported here for the app's pages."""

from indexer.media import (  # noqa: F401
    MAX_INDEXED_BYTES, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, UPLOAD_FORMATS, UPLOAD_SIDE, ImageUnavailable,
    UploadRejected, UploadTooLarge, check_upload, indexed_bytes, indexed_file, parse_image_id, save_upload,
)
