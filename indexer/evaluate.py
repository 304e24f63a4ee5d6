"""``pixquery eval retrieval``: recall of every ranking mode on a fresh temporary index.

Contract (other tools parse it): with ``--json`` stdout is exactly one JSON object::

    {"n_images": N, "n_queries": Q, "encoder": "...",
     "text_to_image": {"<mode>": {"R@1": %, "R@5": %, "R@10": %, "medr": rank}, ...},
     "image_to_text": {"R@1": %, "R@5": %, "R@10": %}}
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.config import EngineConfig
from indexer.engine import MODES, Engine
from indexer.errors import InputError
from captioning.captioner import Captioner
from retrieval.encoder import JointEncoder
from retrieval.metrics import best_ranks_multi, recall_report
from retrieval.native.data import read_captions


def _link_images(images: Path, names: list[str], into: Path) -> None:
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} images named in the caption file are not in {images} (first: {missing[0]})")
    for i, name in enumerate(names):
        # one flat folder of links, named by position so nested names cannot collide
        os.symlink((images / name).resolve(), into / f"{i:07d}{Path(name).suffix.lower()}")


def evaluate_retrieval(images: Path, captions_file: Path, config: EngineConfig, query_batch: int = 256,
                       encoder: JointEncoder | None = None) -> dict:
    """Index exactly the captioned images in a temporary folder and report recall (see module doc)."""
    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist")
    captions = read_captions(captions_file)
    names = list(captions)
    texts = [c for n in names for c in captions[n]]
    owner = np.array([i for i, n in enumerate(names) for _ in captions[n]])  # (Q,) image index of each caption
    with tempfile.TemporaryDirectory(prefix="pixquery-eval-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        _link_images(images, names, tmp_path / "images")
        # no ranking mode reads captions yet, so the temporary index is built without them
        cfg = replace(config, index_dir=tmp_path / "index", captioner=None)
        with Engine(cfg, encoder=encoder) as engine:
            summary = engine.index(tmp_path / "images")
            if summary.skipped:
                bad = "; ".join(s["reason"] for s in engine.skipped_files()[:3])
                raise InputError(f"{summary.skipped} listed images could not be indexed: {bad}")
            # map position-named links back to the caption file's order
            by_pos = {int(Path(p).stem): i for i, p in engine.paths().items()}
            id_of = np.array([by_pos[i] for i in range(len(names))], dtype=np.int64)  # image index -> index id
            pos_of = {int(v): i for i, v in enumerate(id_of)}
            q = np.concatenate([
                engine.encoder.encode_texts(texts[s:s + query_batch])
                for s in tqdm(range(0, len(texts), query_batch), desc="caption queries", unit="batch",
                              disable=not cfg.progress)
            ])  # (Q, D)
            t2i = {}
            for mode in MODES:
                _, ids = engine.search_vectors(q, len(names), mode)  # (Q, N) ids, best first
                ranked = np.vectorize(pos_of.get)(ids)  # (Q, N) image indices
                hit = ranked == owner[:, None]
                ranks = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, len(names) + 1)
                t2i[mode] = recall_report(ranks)
            iv = engine.image_vectors(id_of)  # (N, D)
            i2t = recall_report(best_ranks_multi(iv @ q.T, owner), medr=False)
            return {"n_images": len(names), "n_queries": len(texts), "encoder": engine.encoder.info.name,
                    "text_to_image": t2i, "image_to_text": i2t}


def evaluate_captions(images: Path, captions_file: Path, config: EngineConfig,
                      captioner: Captioner | None = None, batch: int = 32) -> dict:
    """Caption every image named in ``captions_file`` and score against its reference captions.

    Contract: {"n_images": N, "captioner": name, "BLEU-1".."BLEU-4", "CIDEr", "ROUGE-L"} (fractions,
    as the COCO caption evaluation toolkit reports them).
    """
    from captioning.captioner import create_captioner
    from captioning.metrics import caption_scores
    from retrieval.device import resolve_device
    from retrieval.images import load_image

    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist")
    references = read_captions(captions_file)
    names = list(references)
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} images named in the caption file are not in {images} (first: {missing[0]})")
    if captioner is None:
        if not config.captioner:
            raise InputError("no captioner configured: pass --captioner NAME")
        captioner = create_captioner(config.captioner, device=resolve_device(config.device),
                                     cache_dir=config.cache_dir / "models", offline=config.offline)
    hypotheses: dict[str, str] = {}
    for start in tqdm(range(0, len(names), batch), desc="captioning", unit="batch", disable=not config.progress):
        chunk = names[start:start + batch]
        caps = captioner.caption_images([load_image(images / n).image for n in chunk], config.decode)
        hypotheses.update(zip(chunk, caps))
    return {"n_images": len(names), "captioner": captioner.info.name, **caption_scores(references, hypotheses)}
