"""Decoding worker processes read exactly what reader threads read: the same hashes, errors, sizes and
dates, and pixels that normalise on the model's device to the threads' float pixels bit for bit; an
index built through them equals one built through threads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.indexing.discover import discover
from indexer.indexing.procreader import PixelSpec, ProcessReader
from indexer.indexing.reader import read_file
from retrieval.encoder import EncoderInfo, GridEncoder
from retrieval.images import normalize_raw, to_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # per-channel, unlike the native tower's


class TinyGridEncoder(GridEncoder):
    """A 16-d grid encoder at 24 px that takes raw pixels from decoding processes (``pixel_spec``)."""

    pixel_spec = (24, MEAN, STD)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)
        torch.manual_seed(0)
        torch.nn.init.normal_(self.conv.weight)
        self.info = EncoderInfo("test:tiny-grid", hashlib.sha256(b"grid").hexdigest(), 16)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, 24, MEAN, STD)

    @torch.inference_mode()
    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype == torch.uint8:
            pixels = normalize_raw(pixels, MEAN, STD)
        return self.conv(pixels)  # (B, 16, 3, 3)

    @torch.inference_mode()
    def encode_grid(self, grid: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(grid.mean(dim=(2, 3)), dim=-1).numpy()

    def encode_texts(self, texts):
        return np.ones((len(texts), 16), np.float32) / 4.0


class _Models:
    """What read_file needs of the model stage: the encoder's preprocessing only."""

    def __init__(self, encoder):
        self.encoder = encoder

    def preprocess(self, image):
        return self.encoder.preprocess(image), None


@pytest.fixture
def odd_files(tmp_path: Path) -> Path:
    """JPEG, PNG with alpha, grey, palette, EXIF-rotated and dated JPEG, a large JPEG, a corrupt file."""
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(make_dir(root) / f"noise{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (33, 21), dtype=np.uint8), "L").save(root / "grey.png")
    Image.new("P", (20, 20), 3).save(root / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: width and height swap
    exif[0x0132] = "2021:05:04 10:11:12"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(root / "large.jpg", quality=80)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    make_image(root / "flat.png", "red")
    return root


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_processes_read_what_threads_read(odd_files):
    encoder = TinyGridEncoder()
    files = discover(odd_files)
    known = {read_file(files[0].path, files[0], _Models(encoder)).content_hash}  # one file the index holds
    threads = [read_file(f.path, f, _Models(encoder), frozenset(known)) for f in files]
    with ProcessReader(2, PixelSpec(*encoder.pixel_spec), frozenset(known), window=4) as reader:
        procs = list(reader.read_in_order((f.path, f) for f in files))  # window < files: slots are reused
    assert len(procs) == len(threads) == len(files)
    for t, p in zip(threads, procs):
        assert (p.entry, p.content_hash, p.error, p.width, p.height, p.taken_at) == \
               (t.entry, t.content_hash, t.error, t.width, t.height, t.taken_at), t.entry.path
        if t.pixels is None:
            assert p.pixels is None
            continue
        assert p.pixels.dtype == torch.uint8 and p.pixels.shape == (24, 24, 3)
        assert torch.equal(normalize_raw(p.pixels[None], MEAN, STD)[0], t.pixels)  # bit for bit
    assert sum(t.error is not None for t in threads) == 1 and threads[0].pixels is None


def test_index_through_processes_equals_index_through_threads(tmp_path, odd_files):
    results = {}
    for readers in ("threads", "processes"):
        config = EngineConfig(index_dir=tmp_path / readers, progress=False, batch_size=3, captioner=None,
                              scorer=None, readers=readers, workers=2)
        with Engine(config, encoder=TinyGridEncoder()) as engine:
            summary = engine.index(odd_files)
            paths = engine.paths()
            ids = np.array(sorted(paths))
            results[readers] = (summary.embedded, summary.skipped, [paths[i] for i in ids],
                                engine.image_vectors(ids),
                                [(r.width, r.height, r.taken_at) for r in map(engine.image, ids)])
    a, b = results["threads"], results["processes"]
    assert a[:3] == b[:3] and a[4] == b[4] and a[1] == 1
    np.testing.assert_array_equal(a[3], b[3])


def test_processes_find_known_content_without_decoding_it(tmp_path):
    root = tmp_path / "same"
    make_image(root / "one.png", "blue")
    (root / "two.png").write_bytes((root / "one.png").read_bytes())
    files = discover(root)
    digest = hashlib.blake2b((root / "one.png").read_bytes(), digest_size=32).hexdigest()
    with ProcessReader(1, PixelSpec(*TinyGridEncoder.pixel_spec), frozenset({digest, "00" * 32}), 16) as reader:
        out = list(reader.read_in_order((f.path, f) for f in files))
    assert [r.content_hash for r in out] == [digest, digest] and all(r.pixels is None for r in out)


def test_a_script_without_a_main_guard_can_index_through_processes(tmp_path, odd_files):
    """Worker processes do not import the user's script again (it would index inside each worker)."""
    import subprocess
    import sys

    script = tmp_path / "index_it.py"
    script.write_text(
        "from pathlib import Path\n"
        "from indexer.config import EngineConfig\n"
        "from indexer.engine import Engine\n"
        "from test_readers import TinyGridEncoder\n"
        "print('script ran')\n"
        f"config = EngineConfig(index_dir=Path({str(tmp_path / 'idx')!r}), progress=False, captioner=None,\n"
        "                      scorer=None, readers='processes', workers=2, batch_size=4)\n"
        f"print('embedded', Engine(config, encoder=TinyGridEncoder()).index(Path({str(odd_files)!r})).embedded)\n")
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["script ran", "embedded 12"]
