"""What ``pixquery serve`` lets clients do, decided by the server's owner (no web framework here).

* A bearer token (``PIXQUERY_API_TOKEN``) guards every ``/api`` endpoint when set, and must be set
  before the server binds to anything but this computer (:func:`check_bind` refuses otherwise).
* Indexing runs only on folders the server was started with (``--index-folder``): a client names one
  of them, never a path of its own choosing.
* Uploads are bounded in bytes (the request body is cut off past the limit, before it is buffered) and
  in pixels (``indexer/media.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import InputError
from indexer.media import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS

ENV_TOKEN = "PIXQUERY_API_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16
FORM_OVERHEAD = 64_000  # room for a multipart body's other fields and boundaries


@dataclass
class ApiSettings:
    token: str | None = field(default_factory=lambda: os.environ.get(ENV_TOKEN) or None)
    index_folders: tuple[Path, ...] = ()  # the folders a client may start indexing
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    max_k: int = 1000

    def __post_init__(self) -> None:
        if self.token is not None:
            self.token = self.token.strip()
            if len(self.token) < MIN_TOKEN_CHARS:
                raise InputError(f"{ENV_TOKEN} is {len(self.token)} characters long; use a random secret of at "
                                 f"least {MIN_TOKEN_CHARS} (e.g. python -c \"import secrets; "
                                 f"print(secrets.token_urlsafe(32))\")")
        self.index_folders = tuple(Path(f).expanduser().resolve() for f in self.index_folders)
        for folder in self.index_folders:
            if not folder.is_dir():
                raise InputError(f"--index-folder {folder} is not a folder")

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + FORM_OVERHEAD

    def index_folder(self, name: str) -> Path | None:
        """The configured folder a client named (its path as configured or as given), else None."""
        for folder in self.index_folders:
            if name in (str(folder), folder.name) or os.path.normpath(os.path.expanduser(name)) == str(folder):
                return folder
        return None


def check_bind(host: str, settings: ApiSettings) -> None:
    """Refuse to serve beyond this computer without a token (anyone who can reach the address could
    search and see the photos, and start indexing)."""
    if host not in LOOPBACK_HOSTS and not settings.token:
        raise InputError(f"refusing to serve on {host} without a token: anyone who can reach it could search and "
                         f"see your photos. Set {ENV_TOKEN} to a random secret (clients then send "
                         f"'Authorization: Bearer <token>'), or serve on 127.0.0.1")
