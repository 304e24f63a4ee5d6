"""``create_captioner(name, ...)``: the one place that turns a captioner name into a model.

Names:
* ``native:<weights>``: pixquery's own attention decoder over the native image tower's grid (a shipped
  name from ``retrieval/shipped.py``, a path to a file written by ``pixquery train captioner``, or
  several joined by ``+`` to decode together);
* ``hf:<model id or local folder>``: a Hugging Face image-to-text model (BLIP, GIT, VisionEncoderDecoder);
* ``openclip:coca_<arch>/<pretrained tag or checkpoint path>``: an open_clip CoCa model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.captioner import Captioner
from retrieval.errors import InputError


def create_captioner(
    name: str,
    device: torch.device | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
) -> Captioner:
    """Build the captioner called ``name`` on ``device`` (already resolved; CPU when None)."""
    kind, sep, spec = (name or "").partition(":")
    if not sep or not spec:
        raise InputError(f"captioner name {name!r} must look like 'native:<weights>', 'hf:<model>' or 'openclip:coca_*'")
    device = device or torch.device("cpu")
    if kind == "native":
        from captioning.native import NativeCaptioner

        return NativeCaptioner(spec, device=device)
    if kind == "hf":
        from captioning.hf_captioner import HFCaptioner

        return HFCaptioner.from_spec(spec, device=device, cache_dir=cache_dir, offline=offline)
    if kind == "openclip":
        from captioning.coca_captioner import CocaCaptioner

        return CocaCaptioner.from_spec(spec, device=device, cache_dir=cache_dir, offline=offline)
    raise InputError(f"unknown captioner family {kind!r} in {name!r}: use native:, hf: or openclip:")
