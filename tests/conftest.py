"""Shared fixtures: a tiny deterministic encoder, image factories, marker handling."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.captioner import Captioner, CaptionerInfo, DecodeOptions
from pg_server import PgServer, PgServerError, start_server
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.tokenizer import WordTokenizer
from retrieval.encoder import EncoderInfo, JointEncoder

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("PIXQUERY_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_data = (FLICKR8K / "captions.tsv").is_file()
    have_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if "data" in item.keywords and not have_data:
            item.add_marker(pytest.mark.skip(reason=f"Flickr8k not found at {FLICKR8K} (set PIXQUERY_FLICKR8K)"))
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache and index default points into a temporary folder, never the user's home."""
    home = tmp_path_factory.mktemp("home")
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"), ("HF_HOME", "hf")):
        monkeypatch.setenv(var, str(home / sub))
    for var in ("PIXQUERY_DB", "PIXQUERY_DB_URL", "PIXQUERY_ENCODER", "PIXQUERY_DEVICE", "PIXQUERY_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


# --- the databases: SQLite files, and a PostgreSQL server the tests start themselves ------------------
@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    """A PostgreSQL server for the whole session (tests/pg_server.py); its tests skip, saying why, where
    none can be started."""
    try:
        server = start_server()
    except PgServerError as exc:
        pytest.skip(f"PostgreSQL tests need a server: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    url = pg_server.new_database()
    yield url
    pg_server.drop_database(url)


class Databases:
    """Where a test's indexes keep their metadata: ``kind`` is "sqlite" (a file in each index folder) or
    "postgres" (a new database on the test server for each index name)."""

    def __init__(self, kind: str, tmp_path: Path, server: PgServer | None) -> None:
        self.kind, self.tmp_path, self.server = kind, tmp_path, server
        self._urls: dict[str, str] = {}

    def url(self, name: str = "idx") -> str | None:
        """``EngineConfig.db_url`` for index ``name`` (None: SQLite in its folder)."""
        if self.server is None:
            return None
        if name not in self._urls:
            self._urls[name] = self.server.new_database()
        return self._urls[name]

    def store_url(self, name: str = "meta") -> str:
        """A URL for a bare ``Store``: a file in ``tmp_path``, or a database of its own."""
        return self.url(name) or f"sqlite:///{self.tmp_path / (name + '.sqlite')}"

    def close(self) -> None:
        for url in self._urls.values():
            self.server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Databases:
    """Run the test on SQLite and again on PostgreSQL (skipped, saying why, without a server)."""
    server = request.getfixturevalue("pg_server") if request.param == "postgres" else None
    dbs = Databases(request.param, tmp_path, server)
    yield dbs
    dbs.close()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """Record and refuse every connection attempt; point every model cache at ``tmp_path``."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "cache" / var.lower()))
    # offline=True sets these process-wide; register them so they are restored after each test
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE)
    return attempts


def register_open_clip_config(monkeypatch: pytest.MonkeyPatch, folder: Path, name: str, cfg: dict) -> str:
    """Make open_clip know model ``name`` (config ``cfg``) for the current test only."""
    import json

    import open_clip
    from open_clip import factory

    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


class TinyEncoder(JointEncoder):
    """A deterministic 16-d encoder for pipeline tests.

    Images: mean colour of a 4x4 grid (48 numbers) through a fixed random projection.
    Texts: colour words map to the projection of a flat image of that colour, so "red" finds red images.
    """

    COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40),
               "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 160), "orange": (240, 140, 20)}

    def __init__(self, name: str = "test:tiny", seed: int = 0) -> None:
        self.device = torch.device("cpu")
        self.proj = torch.from_numpy(np.random.default_rng(seed).standard_normal((48, 16)).astype(np.float32))
        digest = hashlib.sha256(self.proj.numpy().tobytes()).hexdigest()
        self.info = EncoderInfo(name=name, weights_sha256=digest, dim=16)
        self.encoded_images = 0

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((4, 4), Image.Resampling.BOX), dtype=np.float32)
        return torch.from_numpy(arr / 255.0 - 0.5).permute(2, 0, 1).contiguous()  # (3, 4, 4)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        self.encoded_images += len(pixels)
        x = pixels.reshape(len(pixels), -1) @ self.proj  # (B, 16)
        return torch.nn.functional.normalize(x, dim=-1).numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            words = [w for w in re.findall(r"[a-z]+", text.lower()) if w in self.COLOURS] or ["white"]
            flat = [self.preprocess(Image.new("RGB", (8, 8), self.COLOURS[w])) for w in words]
            rows.append(torch.stack(flat).mean(0))
        x = torch.stack(rows).reshape(len(texts), -1) @ self.proj
        return torch.nn.functional.normalize(x, dim=-1).numpy()


@pytest.fixture
def tiny_encoder() -> TinyEncoder:
    return TinyEncoder()


def make_image(path: Path, colour: tuple[int, int, int] | str, size: tuple[int, int] = (64, 48),
               stripe: tuple[int, int, int] | None = None, fmt: str | None = None) -> Path:
    """Write a flat-colour image (with an optional stripe to make it unique) and return its path."""
    if isinstance(colour, str):
        colour = TinyEncoder.COLOURS[colour]
    im = Image.new("RGB", size, colour)
    if stripe is not None:
        for x in range(size[0]):
            for y in range(size[1] // 4):
                im.putpixel((x, y), stripe)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A small collection: 8 colours x 2 variants, in nested folders, jpg and png."""
    root = tmp_path / "photos"
    for i, name in enumerate(TinyEncoder.COLOURS):
        make_image(root / "a" / f"{name}.png", name)
        make_image(root / "b" / f"{name}-striped.jpg", name, stripe=(i * 30 % 255, 90, 200))
    return root


class TinyCaptioner(Captioner):
    """Names the nearest of TinyEncoder's colours: "a red picture". ``blank`` colours get an empty caption."""

    def __init__(self, name: str = "test:tiny-captioner", template: str = "a {} picture",
                 blank: tuple[str, ...] = ()) -> None:
        self.device = torch.device("cpu")
        self.template, self.blank = template, blank
        self.info = CaptionerInfo(name=name, weights_sha256=hashlib.sha256(template.encode()).hexdigest())
        self.captioned = 0

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((1, 1), Image.Resampling.BOX), dtype=np.float32)
        return torch.from_numpy(arr[0, 0])  # (3,) mean colour

    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        self.captioned += len(pixels)
        names = list(TinyEncoder.COLOURS)
        ref = torch.tensor([TinyEncoder.COLOURS[n] for n in names], dtype=torch.float32)  # (C, 3)
        nearest = torch.cdist(pixels.float(), ref).argmin(dim=1)
        return ["" if names[i] in self.blank else self.template.format(names[i]) for i in nearest.tolist()]


@pytest.fixture
def tiny_captioner() -> TinyCaptioner:
    return TinyCaptioner()


#: a tiny word vocabulary for random native decoders (ensembles, weight averaging)
WORD_CAPTIONS = ["a dog runs", "a cat sits", "the dog sits on grass", "two children play in the water"]


@pytest.fixture
def tok() -> WordTokenizer:
    """A word tokenizer over WORD_CAPTIONS."""
    return WordTokenizer.build(WORD_CAPTIONS, min_count=1)


def random_decoder(tok: WordTokenizer, seed: int, d_model: int = 32) -> CaptionDecoder:
    """A one-layer native decoder with sharp random logits, so two seeds disagree and decoding has no ties."""
    torch.manual_seed(seed)
    model = CaptionDecoder(DecoderConfig(vocab_size=len(tok), d_model=d_model, n_layers=1, n_heads=2,
                                         d_ff=64, max_len=12))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.fixture
def tiny_scorer_weights(tmp_path) -> Path:
    """A native captioner file with a tiny random decoder (d_model 32), to rate text against images."""
    from captioning.native import save_captioner

    torch.manual_seed(0)
    tok = WordTokenizer.build(["a dog runs", "a cat sits", "the dog sits on grass"], min_count=1)
    model = CaptionDecoder(DecoderConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=12))
    for p in model.parameters():  # sharper random logits, so images get clearly different likelihoods
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / "scorer.pt"
    save_captioner(model, tok, path, {"note": "tiny random scorer"})
    return path
