"""Native captioner files, and one backbone pass shared by the native encoder and captioner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.captioner import DecodeOptions
from captioning.factory import create_captioner
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.native import NativeCaptioner, save_captioner
from captioning.tokenizer import WordTokenizer
from indexer.indexing.models import ImageModels
from retrieval.errors import InputError, ModelLoadError
from retrieval.factory import DEFAULT_ENCODER, create_encoder
from retrieval.images import load_image

SAMPLES = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    torch.manual_seed(0)
    tok = WordTokenizer.build(["a dog runs", "a cat sits", "the dog sits on grass"], min_count=1)
    model = CaptionDecoder(DecoderConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=12))
    for p in model.parameters():  # sharper random logits so decoding is not all ties
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / "cap.pt"
    save_captioner(model, tok, path, {"note": "tiny random test model"})
    return path


def test_weights_roundtrip_fp16_and_weights_only(tiny_weights):
    payload = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    cap = create_captioner(f"native:{tiny_weights}")
    assert cap.info.name == f"native:{tiny_weights.resolve()}" and len(cap.info.weights_sha256) == 64


def test_shared_backbone_gives_same_vectors_and_captions(tiny_weights):
    encoder = create_encoder(DEFAULT_ENCODER)
    captioner = NativeCaptioner(str(tiny_weights))
    models = ImageModels(encoder, captioner, DecodeOptions(beam_size=2, max_len=8))
    assert models.shared
    images = [load_image(SAMPLES / n).image for n in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg")]
    enc_px, cap_px = zip(*(models.preprocess(im) for im in images))
    assert cap_px == (None, None)  # one preprocessing, one backbone pass
    out = models.run(torch.stack(enc_px), None)
    np.testing.assert_allclose(out.vectors, encoder.encode_images(images), atol=1e-5)
    alone = captioner.caption_images(images, DecodeOptions(beam_size=2, max_len=8))  # its own tower
    assert [c or "" for c in out.captions] == [" ".join(c.split()) for c in alone]


def test_bad_captioner_names(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown native captioner"):
        create_captioner("native:nope")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a pixquery native captioner"):
        create_captioner(f"native:{tmp_path / 'junk.pt'}")
    for bad in ("", "native", "foo:bar"):
        with pytest.raises(InputError):
            create_captioner(bad)


def test_caption_cli_json_and_bad_files(tiny_weights, tmp_path, capsys):
    import json

    from indexer.cli import main

    (tmp_path / "fake.jpg").write_text("not an image")
    img = str(SAMPLES / "cat_tabby_chelsea_01.jpg")
    assert main(["caption", img, str(tmp_path / "fake.jpg"), "--captioner", f"native:{tiny_weights}",
                 "--beam", "2", "--max-words", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in out["results"]] == [img, str(tmp_path / "fake.jpg")]
    assert out["results"][0]["caption"] and len(out["results"][0]["caption"].split()) <= 6
    assert out["results"][1]["caption"] is None and "not a readable image" in out["results"][1]["error"]
    assert main(["caption", str(tmp_path / "fake.jpg"), "--captioner", f"native:{tiny_weights}"]) == 2
    assert main(["caption", img, "--captioner", "none"]) == 2
    assert "no captioner" in capsys.readouterr().err


@pytest.mark.parametrize("name,word", [("woman_with_dog_on_grass_01.jpg", "dog"), ("surfer_on_wave_01.jpg", "surf"),
                                       ("people_playing_soccer_01.jpg", "soccer"), ("couple_riding_bicycles_01.jpg", "bike")])
def test_shipped_captioner_names_what_is_in_flickr_like_photos(name, word):
    captioner = _shipped()
    caption = captioner.caption_images([load_image(SAMPLES / name).image])[0]
    assert word in caption, caption


@pytest.mark.parametrize("name", ["effl0-sat-v1", "effl0-sat-v4"])  # v1 stays: the ranking's scorer
def test_shipped_captioner_file_is_small_and_weights_only(name):
    from retrieval.shipped import shipped

    path = shipped("captioner", name).path
    assert path.stat().st_size < 30_000_000
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "pixquery-native-captioner/1" and payload["meta"]["dev"]["beam"] == 3


def test_default_captioner_is_the_averaged_model():
    from captioning.native import DEFAULT_CAPTIONER
    from retrieval.shipped import DEFAULTS

    assert DEFAULT_CAPTIONER == "effl0-sat-v4" and DEFAULTS["captioner"] == "native:effl0-sat-v4"


def test_default_decoding_completes_endings_and_bans_repeated_bigrams():
    from captioning.captioner import DecodeOptions
    from captioning.decoding import beam_search
    from captioning.native import NO_REPEAT_NGRAM, decode_captions
    from captioning.tokenizer import DANGLING_WORDS

    captioner = _shipped()
    model, tok = captioner.model, captioner.tokenizer
    ends = tok.ids_of(DANGLING_WORDS)
    assert len(ends) == len(DANGLING_WORDS) and tok.ids_of(["<eos>", "no-such-word"]) == []
    grid = torch.randn(96, 1280, 7, 7, generator=torch.Generator().manual_seed(1)).clamp_min(0)
    with torch.inference_mode():
        plain = beam_search(model, grid, tok.bos_id, tok.eos_id, beam_size=3, max_len=20,
                            banned_ids=(tok.unk_id, tok.pad_id))
        assert decode_captions(model, tok, grid, DecodeOptions(no_repeat_ngram_size=0, complete_endings=False)) \
            == [tok.decode(s) for s in plain]
        default = decode_captions(model, tok, grid)
    assert NO_REPEAT_NGRAM == 2
    repeats = lambda words: len(set(zip(words, words[1:]))) < len(words) - 1  # noqa: E731
    assert any(repeats(tok.decode(s).split()) for s in plain)  # "a brown dog is playing with a brown dog"
    for caption in default:
        words = caption.split()
        assert words and words[-1] not in DANGLING_WORDS, caption
        bigrams = list(zip(words, words[1:]))
        assert len(set(bigrams)) == len(bigrams), caption


_SHIPPED: list = []


def _shipped() -> NativeCaptioner:
    if not _SHIPPED:
        _SHIPPED.append(create_captioner("native:effl0-sat-v4"))
    return _SHIPPED[0]


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (1, 1), (0, 0, 0)),  # tiny
    lambda: Image.new("L", (300, 200), 128),  # grayscale, blank
    lambda: Image.new("CMYK", (120, 90), (0, 50, 100, 0)),
    lambda: Image.new("RGB", (4000, 20), (30, 120, 200)),  # very wide
])
def test_odd_images_get_a_caption_or_none_never_a_crash(make, tmp_path):
    fmt = "JPEG"
    path = tmp_path / "odd.jpg"
    make().save(path, fmt)
    caption = _shipped().caption_images([load_image(path).image])[0]
    assert isinstance(caption, str)
