"""``pixquery`` with the tiny test models, for tests that run the command line in real processes
(kills, Ctrl-C, concurrent runs) without loading the real models::

    PYTHONPATH=.:tests python tests/tiny_cli.py index PHOTOS --db IDX

Every Engine the CLI builds gets TinyEncoder and, unless captions are off, a TinyCaptioner: the
captioner ``test:tiny`` writes "a red picture", ``test:other`` writes "red, in a photo".
``PIXQUERY_TEST_DELAY`` (seconds) slows each model batch down, so that a run lasts long enough to be
killed at a random moment (until the file ``PIXQUERY_TEST_HURRY`` names exists).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioning.captioner import DecodeOptions  # noqa: E402
from conftest import TinyCaptioner, TinyEncoder  # noqa: E402

TEMPLATES = {"test:tiny": "a {} picture", "test:other": "{}, in a photo"}


def delay() -> None:
    seconds = float(os.environ.get("PIXQUERY_TEST_DELAY", "0") or 0)
    hurry = os.environ.get("PIXQUERY_TEST_HURRY")  # once this file exists, no more delay
    if seconds and not (hurry and os.path.exists(hurry)):
        time.sleep(seconds)


class SlowEncoder(TinyEncoder):
    def encode_pixels(self, pixels):  # noqa: ANN001, ANN201
        delay()
        return super().encode_pixels(pixels)


class SlowCaptioner(TinyCaptioner):
    def caption_pixels(self, pixels, options=DecodeOptions()):  # noqa: ANN001, ANN201, B008
        delay()
        return super().caption_pixels(pixels, options)


def tiny_init(original):  # noqa: ANN001, ANN201
    """``Engine.__init__`` that gives every Engine the tiny models (scorer and match head off)."""

    def init(self, config=None, encoder=None, captioner=None, scorer=None):  # noqa: ANN001
        original(self, config, encoder, captioner, scorer)
        self.config.scorer = self.config.matcher = None
        if self._encoder is None:
            self._encoder, self._encoder_injected = SlowEncoder(), True
        name = self.config.captioner
        if self._captioner is None and name:
            self._captioner = SlowCaptioner(name=name, template=TEMPLATES.get(name, "a {} picture"))

    return init


def install() -> None:
    """Make every Engine built from now on in this process use the tiny models."""
    from indexer.engine import Engine

    Engine.__init__ = tiny_init(Engine.__init__)


if __name__ == "__main__":
    install()
    from indexer.cli import main

    sys.exit(main())
