"""Weight averaging of native captioners (a weight-space ensemble: one decoder, one decoder's cost).

Decoders fine-tuned from one another (v3 is v1 after self-critical training) lie in one basin of the
loss, so their parameters can be interpolated (WiSE-FT, Wortsman et al. 2022)::

    theta = sum_m weight_m * theta_m        (weights normalised to sum 1)

Unlike :class:`captioning.ensemble.DecoderEnsemble`, which runs every member at every step, the
result is a single decoder of the members' architecture, decoded at the speed of one. Averaging only
makes sense for members of one lineage; the function checks what it can check (architecture,
vocabulary, parameter names and shapes), and dev evaluation (``pixquery eval captions``) tells
whether the average is any good.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from captioning.model import CaptionDecoder
from captioning.native import load_members, save_captioner
from captioning.tokenizer import WordTokenizer
from retrieval.errors import InputError, ModelLoadError


def average_captioners(spec: str) -> tuple[CaptionDecoder, WordTokenizer, dict]:
    """``spec`` as for an ensemble (``effl0-sat-v4@0.5+effl0-sat-v1@0.5``, names or paths) ->
    (averaged decoder, the shared tokenizer, provenance: members, normalised weights, sha256s)."""
    members = load_members(spec.removeprefix("native:"))
    if len(members) < 2:
        raise InputError(f"averaging needs at least two captioners joined by '+', got {spec!r}")
    total = sum(m.weight for m in members)
    first = members[0]
    states = []
    for m in members:
        if m.tokenizer.to_dict() != first.tokenizer.to_dict():
            raise ModelLoadError(f"cannot average {m.name} with {first.name}: their vocabularies differ")
        if asdict(m.decoder.cfg) != asdict(first.decoder.cfg):
            raise ModelLoadError(f"cannot average {m.name} with {first.name}: their architectures differ "
                                 f"({asdict(m.decoder.cfg)} against {asdict(first.decoder.cfg)})")
        states.append((m.decoder.state_dict(), m.weight / total))
    reference = states[0][0]
    averaged = {}
    for key, value in reference.items():
        if value.is_floating_point():
            averaged[key] = sum(state[key] * w for state, w in states)
        else:  # integer buffers (none today) must agree
            if any(not torch.equal(state[key], value) for state, _ in states):
                raise ModelLoadError(f"cannot average: integer buffer {key} differs between members")
            averaged[key] = value
    first.decoder.load_state_dict(averaged)
    meta = {"averaged": [{"captioner": m.name, "weight": m.weight / total, "sha256": m.sha256} for m in members],
            "spec": spec}
    return first.decoder.eval(), first.tokenizer, meta


def write_average(spec: str, out: Path, data: Path | None = None, cache_dir: Path | None = None,
                  beam: int = 3) -> dict:
    """Average ``spec``'s captioners into the weight file ``out`` (fp16, ``weights_only``-loadable),
    with dev scores (default decoding at ``beam``) when ``data`` is the Flickr8k folder and
    ``cache_dir`` the grid-feature cache; -> the metadata saved with it (also written next to it as JSON)."""
    if data is not None and cache_dir is None:
        raise ValueError("scoring on dev needs the grid-feature cache folder (cache_dir)")
    model, tok, meta = average_captioners(spec)
    if data is not None:
        from captioning.training.captioner import evaluate_split
        from retrieval.native.training.data import load_flickr8k
        from retrieval.native.training.features import grid_features

        dev = load_flickr8k(data, "dev")
        grid = grid_features(dev.paths, cache_dir, torch.device("cpu"))
        model.half().float()  # score what the fp16 file will hold
        meta["dev"] = {"beam": beam, **{k: round(v, 4) for k, v in evaluate_split(model, tok, dev, grid, beam).items()}}
    save_captioner(model, tok, out, meta)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_suffix(".json").write_text(json.dumps({**meta, "sha256": sha}, indent=2) + "\n")
    return meta
