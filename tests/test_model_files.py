"""Model files are data, never code: every ``torch.load`` in pixquery passes ``weights_only=True`` (or the
weights are safetensors), nothing unpickles with ``allow_pickle=True`` or ``pickle``, and a weight file
carrying a pickled payload is refused by each loader with a typed error before the payload can run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from conftest import register_open_clip_config
from retrieval.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "captioning", "indexer", "ui")


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_load_in_the_code_is_weights_only():
    torch_loads, problems = 0, []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node, name in calls(tree):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if name == "torch.load":
                    torch_loads += 1
                    if kw.get("weights_only") != "True":
                        problems.append(f"{where}: torch.load without weights_only=True")
                if kw.get("weights_only") == "False" or kw.get("allow_pickle") == "True":
                    problems.append(f"{where}: {name}(... {kw})")
                if name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "cPickle", "dill",
                                                                                        "joblib"):
                    problems.append(f"{where}: {name}")
    assert torch_loads >= 4 and not problems, problems


class Payload:
    """Pickles as "call Path.touch(marker)": proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return Path.touch, (self.marker,)


def hostile_file(path: Path, marker: Path, **fields) -> Path:
    torch.save({"format": "anything", "config": Payload(marker), "state_dict": {}, **fields}, path)
    return path


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    torch.load(hostile_file(tmp_path / "evil.pt", marker), weights_only=False)  # the oracle: it is live
    assert marker.exists()


@pytest.mark.parametrize("loader", ["encoder heads", "captioner", "match head", "open_clip checkpoint"])
def test_each_loader_refuses_a_pickled_payload(loader, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = hostile_file(tmp_path / "evil.pt", marker)
    with pytest.raises(ModelLoadError):
        if loader == "encoder heads":
            from retrieval.native.model import load_heads

            load_heads(evil)
        elif loader == "captioner":
            from captioning.factory import create_captioner

            create_captioner(f"native:{evil}")
        elif loader == "match head":
            from retrieval.native.matcher import load_matcher

            load_matcher(evil)
        else:
            from retrieval.factory import create_encoder
            from test_openclip_encoder import TINY, TINY_CFG

            register_open_clip_config(monkeypatch, tmp_path, TINY, TINY_CFG)
            torch.save({"state_dict": Payload(marker)}, evil)
            create_encoder(f"openclip:{TINY}/{evil}")
    assert not marker.exists(), f"the {loader} loader ran code from a weight file"
