"""Cache frozen-tower features on disk so that training epochs cost seconds, not minutes.

Grid features of the image tower are stored as float16 ``(N, 1280, 7, 7)`` arrays (``.npy``,
memory-mapped on load); text features as float32 ``(M, 384)``. The same grid cache serves the
encoder heads (mean-pooled) and the captioner (attention over the 49 cells).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from retrieval.images import load_image, to_tensor
from retrieval.native.towers import GRID_DIM, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, ImageTower, TextTower

log = logging.getLogger(__name__)


def _key(items: Sequence[str], tag: str) -> str:
    h = hashlib.sha256(tag.encode())
    for item in items:
        h.update(item.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _pixels(path: Path, flip: bool) -> torch.Tensor:
    image = load_image(path).image
    x = to_tensor(image, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)
    return x.flip(-1) if flip else x


def grid_features(
    paths: Sequence[Path], cache_dir: Path, device: torch.device, batch_size: int = 64,
    flip: bool = False, tower: ImageTower | None = None,
) -> np.ndarray:
    """(N, 1280, 7, 7) float16 grid features of ``paths`` (horizontally flipped if ``flip``), cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # absolute paths: "../shared/data/flickr8k" and its absolute spelling share one cache entry
    key = _key([str(Path(p).resolve()) for p in paths], f"effl0-grid-v1-flip{int(flip)}")
    out = cache_dir / f"grid-{key}.npy"
    if out.exists():
        return np.load(out, mmap_mode="r")
    tower = tower or ImageTower()
    tower = tower.to(device).to(memory_format=torch.channels_last).eval()
    tmp = out.with_suffix(".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(paths), GRID_DIM, 7, 7))
    with ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode():
        bar = tqdm(total=len(paths), desc=f"image features{' (flipped)' if flip else ''}", unit="img")
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            x = torch.stack(list(pool.map(lambda p: _pixels(p, flip), chunk))).to(device)
            g = tower(x.contiguous(memory_format=torch.channels_last))  # (B, 1280, 7, 7)
            arr[start:start + len(chunk)] = g.float().cpu().numpy().astype(np.float16)
            bar.update(len(chunk))
        bar.close()
    arr.flush()
    del arr
    tmp.replace(out)
    return np.load(out, mmap_mode="r")


def text_features(
    texts: Sequence[str], cache_dir: Path, device: torch.device, batch_size: int = 256,
    tower: TextTower | None = None,
) -> np.ndarray:
    """(M, 384) float32 mean-pooled MiniLM features of ``texts``, cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"text-{_key(texts, 'minilm-mean-v1')}.npy"
    if out.exists():
        return np.load(out)
    tower = (tower or TextTower()).to(device).eval()
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch"):
            chunks.append(tower(list(texts[start:start + batch_size])).float().cpu().numpy())
    feats = np.concatenate(chunks).astype(np.float32)
    np.save(out.with_suffix(".tmp.npy"), feats)
    out.with_suffix(".tmp.npy").replace(out)
    return feats
