"""Weight averaging of native captioners (captioning/average.py, ``pixquery train average``)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORD_CAPTIONS, random_decoder
from captioning.training.average import average_captioners, write_average
from captioning.native import NativeCaptioner, load_captioner, save_captioner
from captioning.tokenizer import WordTokenizer
from indexer.cli import main
from retrieval.errors import InputError, ModelLoadError


@pytest.fixture
def files(tmp_path, tok):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_captioner(random_decoder(tok, 0), tok, a, {})
    save_captioner(random_decoder(tok, 1), tok, b, {})
    return a, b


def test_average_is_the_weighted_mean_of_the_parameters(files):
    a, b = files
    model, _, meta = average_captioners(f"{a}@3+{b}@1")
    sa, sb = load_captioner(a)[0].state_dict(), load_captioner(b)[0].state_dict()
    state = model.state_dict()
    assert set(state) == set(sa)
    for key in sa:
        torch.testing.assert_close(state[key], 0.75 * sa[key] + 0.25 * sb[key])
    assert [m["weight"] for m in meta["averaged"]] == [0.75, 0.25]
    assert [m["captioner"] for m in meta["averaged"]] == [str(a), str(b)]
    assert all(len(m["sha256"]) == 64 for m in meta["averaged"])


def test_a_decoder_averaged_with_itself_captions_like_itself(files, tmp_path):
    a, _ = files
    write_average(f"native:{a}+{a}", tmp_path / "same.pt")
    grid = torch.randn(3, 1280, 7, 7, generator=torch.Generator().manual_seed(0))
    assert NativeCaptioner(str(tmp_path / "same.pt")).caption_grid(grid) == NativeCaptioner(str(a)).caption_grid(grid)


def test_average_refuses_what_cannot_be_averaged(files, tmp_path, tok):
    a, b = files
    with pytest.raises(InputError, match="at least two"):
        average_captioners(str(a))
    wide = tmp_path / "wide.pt"
    save_captioner(random_decoder(tok, 2, d_model=48), tok, wide, {})
    with pytest.raises(ModelLoadError, match="architectures differ"):
        average_captioners(f"{a}+{wide}")
    other_tok = WordTokenizer.build(WORD_CAPTIONS[:-1] + ["two children play in the sand"], min_count=1)
    assert len(other_tok) == len(tok)  # same size, other words
    other = tmp_path / "other.pt"
    save_captioner(random_decoder(other_tok, 3), other_tok, other, {})
    with pytest.raises(ModelLoadError, match="vocabularies differ"):
        average_captioners(f"{a}+{other}")


def test_train_average_cli_writes_a_loadable_file_and_its_log(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "avg.pt"
    assert main(["train", "average", f"{a}@0.5+{b}@0.5", "--out", str(out)]) == 0
    assert "average of" in capsys.readouterr().out
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["format"] == "pixquery-native-captioner/1"
    log = json.loads(out.with_suffix(".json").read_text())
    assert [m["weight"] for m in log["averaged"]] == [0.5, 0.5] and len(log["sha256"]) == 64
    # bad specs are messages and exit codes, not tracebacks, and write nothing
    missing = tmp_path / "nothing.pt"
    assert main(["train", "average", f"{a}+{tmp_path / 'no-such.pt'}", "--out", str(missing)]) != 0
    assert main(["train", "average", f"{a}@-1+{b}", "--out", str(missing)]) != 0
    assert "must be a positive number" in capsys.readouterr().err
    assert not missing.exists()
