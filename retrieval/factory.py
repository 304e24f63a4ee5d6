"""``create_encoder(name, ...)``: the one place that turns an encoder name into a model.

Names:
* ``native:<heads>``: the offline default (``DEFAULT_ENCODER``, from retrieval/shipped.py) or
  ``native:/path/heads.pt``.
* ``openclip:<architecture>/<pretrained tag or checkpoint path>``, e.g.
  ``openclip:ViT-B-32/laion2b_s34b_b79k`` or ``openclip:ViT-B-32//models/my_clip.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from retrieval.encoder import JointEncoder
from retrieval.errors import InputError
from retrieval.shipped import DEFAULTS

DEFAULT_ENCODER = DEFAULTS["encoder"]


def create_encoder(
    name: str = DEFAULT_ENCODER,
    device: torch.device | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
) -> JointEncoder:
    """Build the encoder called ``name`` on ``device`` (already resolved; CPU when None).

    ``cache_dir`` and ``offline`` apply to models fetched from a hub (open_clip); the native
    encoder never touches the network.
    """
    kind, sep, spec = (name or "").partition(":")
    if not sep or not spec:
        raise InputError(f"encoder name {name!r} must look like 'native:<heads>' or 'openclip:<arch>/<pretrained>'")
    device = device or torch.device("cpu")
    if kind == "native":
        from retrieval.native.model import NativeEncoder

        return NativeEncoder(spec, device=device, cache_dir=Path(cache_dir) if cache_dir is not None else None)
    if kind == "openclip":
        from retrieval.openclip_encoder import OpenClipEncoder

        return OpenClipEncoder.from_spec(spec, device=device, cache_dir=cache_dir, offline=offline)
    raise InputError(f"unknown encoder family {kind!r} in {name!r}: use native: or openclip:")
