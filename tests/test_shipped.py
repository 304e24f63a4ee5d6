"""The registry of shipped weights (retrieval/shipped.py): every file is there, loads without pickled code,
and is the file the registry names; no code, help text or docstring names weights that are not shipped."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from retrieval.errors import ModelLoadError
from retrieval.shipped import DEFAULTS, SHIPPED, names, resolve_weights, shipped

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"encoder": "pixquery-native-heads/1", "captioner": "pixquery-native-captioner/1",
           "rater": "pixquery-native-captioner/1", "matcher": "pixquery-native-matcher/1", "tagger": "pixquery-tagger/1",
           "confidence": "pixquery-confidence/1"}


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_every_shipped_file_is_there_with_its_sha256_and_loads_weights_only(entry):
    data = entry.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    payload = torch.load(entry.path, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMATS[entry.kind]
    assert entry.path.with_suffix(".json").is_file()  # its training log ships beside it


def test_defaults_name_shipped_weights_of_the_right_kind():
    kinds = {"encoder": "encoder", "captioner": "captioner", "scorer": "captioner", "rater": "rater", "matcher": "matcher",
             "tagger": "tagger", "confidence": "confidence"}
    for role, name in DEFAULTS.items():
        assert shipped(kinds[role], name.removeprefix("native:")) is not None, role


def test_the_shipped_rater_rates_for_the_shipped_scorer():
    from captioning.native import load_captioner

    rater, _, meta, _ = load_captioner(shipped("rater", "effl0-sat-v1-rater1").path)
    assert meta["scorer_sha256"] == shipped("captioner", DEFAULTS["scorer"].removeprefix("native:")).sha256
    assert rater.cfg.n_layers == 1


def test_resolve_weights_names_and_paths(tmp_path):
    assert resolve_weights("effl0-sat-v4", "captioner") == shipped("captioner", "effl0-sat-v4").path
    with pytest.raises(ModelLoadError, match="shipped: effl0-sat-v4, effl0-sat-v1"):
        resolve_weights("effl0-sat-v3", "captioner")
    with pytest.raises(ModelLoadError, match="do not exist"):
        resolve_weights(str(tmp_path / "mine.pt"), "captioner")


WEIGHT_NAME = re.compile(r"\beffl0-(?:minilm|sat|match)-v\d+\b")


def test_no_code_or_help_text_names_weights_that_are_not_shipped():
    """Historical names may appear in docs/ (results of earlier models) and as paths of files a training
    command writes (runs/...); never as something to load."""
    every = {s.name for s in SHIPPED}
    stale = []
    for path in [*REPO.glob("retrieval/**/*.py"), *REPO.glob("captioning/**/*.py"), *REPO.glob("indexer/**/*.py"),
                 *REPO.glob("ui/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in WEIGHT_NAME.finditer(line):
                if m.group(0) not in every and "runs/" not in line[max(0, m.start() - 30):m.start()]:
                    stale.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not stale, stale
    assert set(names("captioner")) == {"effl0-sat-v4", "effl0-sat-v1"}
