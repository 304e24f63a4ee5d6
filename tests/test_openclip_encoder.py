"""OpenClipEncoder against a tiny random-initialised open_clip model; never touches the network."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import register_open_clip_config
from retrieval.errors import InputError, ModelLoadError
from retrieval.factory import create_encoder
from retrieval.openclip_encoder import file_sha256, parse_spec

import open_clip  # a declared dependency: fail loudly if it is missing

TINY = "pixquery-tiny-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEXTS = ["a dog on a beach", "two red cars", ""]


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: refuse and record connections


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Register the tiny config with open_clip for this test only."""
    return register_open_clip_config(monkeypatch, tmp_path, TINY, TINY_CFG)


def make_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def ckpt(tiny_arch: str, tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "tiny.pt", seed=0)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), mode="L")
    return [rgb, grey]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shapes_dtype_and_unit_norm(ckpt: Path) -> None:
    enc = create_encoder(f"openclip:{TINY}/{ckpt}")
    assert enc.preprocess(images()[0]).shape == (3, 32, 32)
    for out, n in ((enc.encode_texts(TEXTS), 3), (enc.encode_images(images()), 2)):
        assert out.shape == (n, 32) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 32)
    assert enc.encode_images([]).shape == (0, 32)
    assert not enc.model.training


def test_matches_open_clip_loaded_directly(ckpt: Path) -> None:
    enc = create_encoder(f"openclip:{TINY}/{ckpt}")
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer(TINY)
    model.eval()
    with torch.no_grad():
        want_text = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
        want_image = model.encode_image(torch.stack([preprocess(im) for im in images()]), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_texts(TEXTS), want_text, atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(images()), want_image, atol=1e-5)


def test_info_dim_and_fingerprint(ckpt: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    a = create_encoder(f"openclip:{TINY}/{ckpt}")
    b = create_encoder(f"openclip:{TINY}/{other}")
    assert a.info.name == f"openclip:{TINY}/{ckpt}"
    assert a.info.dim == a.dim == 32
    assert a.info.weights_sha256 == sha256(ckpt)
    assert b.info.weights_sha256 == sha256(other)
    assert a.info.fingerprint != b.info.fingerprint
    assert not np.allclose(a.encode_texts(TEXTS), b.encode_texts(TEXTS))


def test_relative_and_home_paths(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ckpt.parent)
    monkeypatch.setenv("HOME", str(ckpt.parent))
    for weights in ("./tiny.pt", "~/tiny.pt", "tiny.pt"):
        enc = create_encoder(f"openclip:{TINY}/{weights}")
        assert enc.info.weights_sha256 == sha256(ckpt)


def test_missing_or_corrupt_checkpoint(tiny_arch: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_encoder(f"openclip:{TINY}/{tmp_path / 'nope.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="bad.pt"):
        create_encoder(f"openclip:{TINY}/{bad}")


def test_unknown_architecture_and_tag(tiny_arch: str) -> None:
    with pytest.raises(ModelLoadError, match=r"list_models\(\)"):
        create_encoder("openclip:NoSuchNet-99/laion2b_s34b_b79k")
    with pytest.raises(ModelLoadError, match="neither an open_clip pretrained tag"):
        create_encoder(f"openclip:{TINY}/no_such_tag")


@pytest.mark.parametrize(
    "name", ["openclip:ViT-B-32", "openclip:/x", "openclip:ViT-B-32/", "openclip: /x", "openclip:hf-hub:", "openclip:hf-hub:org"]
)
def test_malformed_spec(name: str) -> None:
    with pytest.raises(InputError):
        create_encoder(name)


def test_parse_spec() -> None:
    assert parse_spec("ViT-B-32/laion2b_s34b_b79k").checkpoint is None
    assert parse_spec("ViT-B-32//abs/model.pt").checkpoint == Path("/abs/model.pt")
    assert parse_spec("ViT-B-32/~/ckpt.safetensors").checkpoint == Path("~/ckpt.safetensors").expanduser()
    assert parse_spec("ViT-B-32/weights.bin").checkpoint == Path("weights.bin")
    hub = parse_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert hub.arch == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and hub.pretrained is None


@pytest.mark.parametrize("spec", ["ViT-B-32/laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_offline_uncached_fails_fast_without_network(spec: str, tmp_path: Path, no_network: list) -> None:
    cache = tmp_path / "empty-cache"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        create_encoder(f"openclip:{spec}", cache_dir=cache, offline=True)
    assert time.monotonic() - start < 15
    assert no_network == []
    message = str(err.value)
    assert spec in message and str(cache) in message and "online" in message


def test_hf_cache_blob_name_is_used_as_sha256(tmp_path: Path) -> None:
    """Hub LFS blobs are named by their sha256: the name is trusted, the bytes are not re-read."""
    data = b"weights"
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(data)
    link = tmp_path / "snapshots" / "abc" / "open_clip_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert file_sha256(link) == "ab" * 32
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    assert file_sha256(plain) == hashlib.sha256(data).hexdigest()
