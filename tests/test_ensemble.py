"""Native captioner ensembles: several decoders writing one caption (captioning/ensemble.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_decoder
from captioning.captioner import DecodeOptions
from captioning.factory import create_captioner
from captioning.decoding import beam_search
from captioning.ensemble import DecoderEnsemble
from captioning.native import NativeCaptioner, parse_ensemble_spec, save_captioner
from captioning.tokenizer import WordTokenizer
from retrieval.errors import InputError, ModelLoadError


@pytest.fixture
def two_files(tmp_path, tok) -> tuple[Path, Path]:
    paths = tmp_path / "a.pt", tmp_path / "b.pt"
    save_captioner(random_decoder(tok, 0), tok, paths[0], {})
    save_captioner(random_decoder(tok, 1, d_model=48), tok, paths[1], {})  # another width: memories differ in size
    return paths


def test_combined_log_probs_are_the_weighted_sum_of_the_members(tok):
    a, b = random_decoder(tok, 0), random_decoder(tok, 1, d_model=48)
    ens = DecoderEnsemble([a, b], [3, 1]).eval()
    assert ens.weights == [0.75, 0.25] and ens.cfg.d_model == 80
    grid = torch.randn(2, 1280, 7, 7)
    tokens = torch.tensor([[tok.bos_id, 4, 5, 6], [tok.bos_id, 7, 4, 5]])
    with torch.no_grad():
        memory = ens.encode(grid)  # (2, 49, 32 + 48)
        assert memory.shape == (2, 49, 80)
        want = 0.75 * F.log_softmax(a(grid, tokens), -1) + 0.25 * F.log_softmax(b(grid, tokens), -1)
        torch.testing.assert_close(ens.decode(memory, tokens), want)
        # stepping with the caches gives what teacher forcing gives
        cache, steps = ens.init_cache(memory), []
        for t in range(tokens.shape[1]):
            out, cache = ens.step(tokens[:, t:t + 1], memory, cache)
            steps.append(out)
        torch.testing.assert_close(torch.stack(steps, 1), want, atol=1e-5, rtol=1e-5)


def test_greedy_search_follows_the_combined_argmax(tok):
    a, b = random_decoder(tok, 0), random_decoder(tok, 1)
    ens = DecoderEnsemble([a, b], [1, 1]).eval()
    grid = torch.randn(3, 1280, 7, 7)
    got = beam_search(ens, grid, tok.bos_id, tok.eos_id, beam_size=1, max_len=8, banned_ids=(tok.unk_id, tok.pad_id))
    with torch.no_grad():
        for i, seq in enumerate(got):  # re-derive each greedy caption from the members' own forward passes
            prefix = [tok.bos_id]
            for _ in range(8):
                x = torch.tensor([prefix])
                lp = 0.5 * F.log_softmax(a(grid[i:i + 1], x)[0, -1], -1) + 0.5 * F.log_softmax(b(grid[i:i + 1], x)[0, -1], -1)
                lp[[tok.bos_id, tok.unk_id, tok.pad_id]] = float("-inf")
                nxt = int(lp.argmax())
                if nxt == tok.eos_id:
                    break
                prefix.append(nxt)
            assert seq == prefix[1:]
    alone = beam_search(a, grid, tok.bos_id, tok.eos_id, beam_size=1, max_len=8, banned_ids=(tok.unk_id, tok.pad_id))
    assert got != alone  # the second member changes what is written (random members disagree)


def test_a_decoder_twice_is_the_decoder(two_files):
    a = str(two_files[0])
    single, double = NativeCaptioner(a), NativeCaptioner(f"{a}@0.3+{a}@0.7")
    grid = torch.randn(4, 1280, 7, 7)
    options = DecodeOptions(beam_size=3, max_len=8)
    assert double.caption_grid(grid, options) == single.caption_grid(grid, options)
    mem = double.memory(grid)
    assert mem.shape == (4, 49 * 64) and double.memory_shape == (49, 64)
    texts = ["a dog runs", "a cat", "two children", "grass"]
    got = double.log_likelihood(mem, texts)
    want = single.log_likelihood(single.memory(grid), texts)
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), atol=2e-2, rtol=5e-3)  # bfloat16 where fast


def test_ensemble_provenance_names_members_and_weights(two_files):
    a, b = (str(p.resolve()) for p in two_files)
    cap = create_captioner(f"native:{a}@3+{b}")
    assert cap.info.name == f"native:{a}@0.75+{b}@0.25"
    other = create_captioner(f"native:{a}@1+{b}@1")
    assert other.info.name == f"native:{a}@0.5+{b}@0.5"
    assert len(cap.info.weights_sha256) == 64 and cap.info.fingerprint != other.info.fingerprint
    captions = cap.caption_grid(torch.randn(2, 1280, 7, 7), DecodeOptions(beam_size=2, max_len=6))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_ensemble_spec_parsing_and_errors(two_files, tmp_path):
    assert parse_ensemble_spec("effl0-sat-v3@0.6+effl0-sat-v1@0.4") == [("effl0-sat-v3", 0.6), ("effl0-sat-v1", 0.4)]
    assert parse_ensemble_spec("x + y@2") == [("x", 1.0), ("y", 2.0)]
    assert parse_ensemble_spec(str(two_files[0])) == [(str(two_files[0]), 1.0)]
    odd = tmp_path / "odd+name@2.pt"  # an existing file is one member, whatever its name
    odd.write_bytes(two_files[0].read_bytes())
    assert parse_ensemble_spec(str(odd)) == [(str(odd), 1.0)]
    for bad, message in (("a+", "empty name"), ("a@x+b", "not a number"), ("a@0+b", "positive"),
                         ("a@-1+b", "positive"), ("a@inf+b", "positive")):
        with pytest.raises(InputError, match=message):
            parse_ensemble_spec(bad)
    with pytest.raises(ModelLoadError, match="unknown native captioner"):
        create_captioner(f"native:{two_files[0]}+nope")


def test_members_must_share_the_vocabulary(two_files, tmp_path):
    other_tok = WordTokenizer.build(["completely different words here"], min_count=1)
    path = tmp_path / "c.pt"
    save_captioner(random_decoder(other_tok, 2), other_tok, path, {})
    with pytest.raises(ModelLoadError, match="another vocabulary"):
        NativeCaptioner(f"{two_files[0]}+{path}")


def test_ensemble_captions_in_the_shared_backbone_pass_and_the_cli(two_files, capsys):
    """Indexing hands the encoder's grid to an ensemble as to one decoder; ``pixquery caption`` takes the spec."""
    import json

    from indexer.cli import main
    from indexer.indexing.models import ImageModels
    from retrieval.factory import DEFAULT_ENCODER, create_encoder
    from retrieval.images import load_image

    samples = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"
    spec = f"{two_files[0]}@0.6+{two_files[1]}@0.4"
    captioner = NativeCaptioner(spec)
    options = DecodeOptions(beam_size=2, max_len=8)
    models = ImageModels(create_encoder(DEFAULT_ENCODER), captioner, options)
    assert models.shared
    files = [samples / n for n in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg")]
    images = [load_image(f).image for f in files]
    enc_px, _ = zip(*(models.preprocess(im) for im in images))
    out = models.run(torch.stack(enc_px), None)
    alone = captioner.caption_images(images, options)
    assert [c or "" for c in out.captions] == [" ".join(c.split()) for c in alone]

    assert main(["caption", *map(str, files), "--captioner", f"native:{spec}", "--beam", "2", "--max-words", "8", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captioner"] == captioner.info.name and len(report["results"]) == 2
    assert [r["caption"] for r in report["results"]] == [c or None for c in alone]
