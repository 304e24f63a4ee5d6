"""Hugging Face image-to-text captioners: BLIP, GIT and VisionEncoderDecoder models (``hf:<spec>``).

Specs (the part after ``hf:``):
* ``Salesforce/blip-image-captioning-base``: a Hugging Face Hub model id, fetched into ``cache_dir``
  (the default Hugging Face cache when None) unless it is already there;
* ``/abs/folder``, ``./folder`` or ``~/folder``: a local folder written by ``save_pretrained``,
  holding ``config.json``, the weights, the tokenizer files and ``preprocessor_config.json``.

image -> image processor -> pixel_values (3, H, W)
pixels (B, 3, H, W) -> model.generate (beam search, greedy when beam_size=1) -> token ids (B, T)
      -> tokenizer.batch_decode(skip_special_tokens=True) -> B captions, whitespace collapsed

The model class is picked from the config's ``model_type`` (:data:`MODEL_CLASSES`), not from
``AutoModelForImageTextToText``: that auto class also maps chat models that need a prompt, and
in transformers 5 it does not map ``vision-encoder-decoder`` at all.

A caption may decode to ``""`` (a model that only produces special tokens). It is returned as
it is, never replaced by a made-up fallback: the indexer treats an empty caption as "no caption".

transformers is imported inside :meth:`HFCaptioner.from_spec`, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioning.captioner import Captioner, CaptionerInfo, DecodeOptions
from retrieval.errors import InputError, ModelLoadError
from retrieval.openclip_encoder import file_sha256, set_offline

# config.model_type -> the transformers class that captions an image from pixel_values alone
MODEL_CLASSES = {
    "blip": "BlipForConditionalGeneration",
    "git": "GitForCausalLM",
    "vision-encoder-decoder": "VisionEncoderDecoderModel",
}
# DecodeOptions.max_len counts words; models count sub-word tokens, punctuation and <eos>
TOKEN_SLACK = 4
# weights files in the order transformers prefers them; a sharded model has an index instead
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be a folder: Hub ids are ``name`` or ``org/name``."""
    return spec.startswith(("/", "~", ".")) or "\\" in spec or spec.count("/") > 1


def resolve_source(spec: str) -> tuple[str, Path | None]:
    """``spec`` -> (what to pass to ``from_pretrained``, the local folder or None for a Hub id).

    An existing folder wins over a Hub id of the same name. A path-like spec that is not a folder
    is a :class:`ModelLoadError`; a spec that is neither a path nor a valid Hub id an :class:`InputError`.
    """
    spec = (spec or "").strip()
    if not spec:
        raise InputError("the Hugging Face captioner needs a model id or a folder: 'hf:<org>/<model>' or 'hf:/path'")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return str(folder.resolve()), folder.resolve()
    if folder.exists():
        raise ModelLoadError(f"{folder} is a file, not a model folder written by save_pretrained")
    if _looks_like_path(spec):
        raise ModelLoadError(
            f"model folder {folder} does not exist; give a folder written by save_pretrained "
            f"or a Hugging Face model id such as 'Salesforce/blip-image-captioning-base'"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError as exc:
        raise InputError(
            f"{spec!r} is neither a folder nor a Hugging Face model id "
            f"like 'Salesforce/blip-image-captioning-base': {exc}"
        ) from exc
    return spec, None


def _snapshot_folder(repo_id: str, cache_dir: str | None) -> Path:
    """The cache snapshot folder of a Hub model that has just been loaded (so is cached)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if not isinstance(config, str):
        raise ModelLoadError(f"{repo_id} loaded but its config.json is not in the cache {cache_dir or '(default)'}")
    return Path(config).parent


def weights_sha256(folder: Path) -> str:
    """sha256 of the weights in a ``save_pretrained`` folder or Hub snapshot.

    A single file is hashed as it is (a Hub blob by its name, see :func:`file_sha256`); a sharded
    model is hashed as the sha256 of its ``"<shard name> <shard sha256>"`` lines, in name order.
    """
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    for name in WEIGHTS_INDEXES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            lines = "".join(f"{shard} {file_sha256(folder / shard)}\n" for shard in shards)
            return hashlib.sha256(lines.encode()).hexdigest()
    raise ModelLoadError(f"no weights file ({', '.join(WEIGHTS_FILES + WEIGHTS_INDEXES)}) in {folder}")


class HFCaptioner(Captioner):
    """A Hugging Face image-to-text model behind the :class:`Captioner` interface (``hf:<spec>``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        tokenizer: Any,
        info: CaptionerInfo,
        device: torch.device,
    ) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.info = info
        self.device = device

    @classmethod
    def from_spec(
        cls,
        spec: str,
        device: torch.device | None = None,
        cache_dir: str | Path | None = None,
        offline: bool = False,
    ) -> HFCaptioner:
        """Build the captioner for ``spec`` (a Hub model id or a local folder) on ``device``
        (already resolved; CPU when None).

        With ``offline`` nothing is downloaded: a Hub model must already be in ``cache_dir``.
        Every failure to build the model is a :class:`ModelLoadError` that says how to get it.
        """
        source, folder = resolve_source(spec)
        device = device or torch.device("cpu")
        cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
        if offline:
            set_offline()
        try:
            import transformers

            where = {"cache_dir": cache, "local_files_only": offline}
            config = transformers.AutoConfig.from_pretrained(source, **where)
            class_name = MODEL_CLASSES.get(config.model_type)
            if class_name is None:
                raise ModelLoadError(
                    f"'hf:{spec}' is a {config.model_type!r} model; pixquery captions with "
                    f"{', '.join(sorted(MODEL_CLASSES))} models (e.g. 'hf:Salesforce/blip-image-captioning-base')"
                )
            model = getattr(transformers, class_name).from_pretrained(source, config=config, **where)
            model = model.to(device=device, dtype=torch.float32)
            image_processor = transformers.AutoImageProcessor.from_pretrained(source, **where)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **where)
            sha = weights_sha256(folder if folder is not None else _snapshot_folder(source, cache))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot be used
            raise ModelLoadError(_load_failure(spec, folder, cache, offline, exc)) from exc
        # a local folder is named by its resolved path, so "./blip" and "/abs/blip" agree
        info = CaptionerInfo(name=f"hf:{folder if folder is not None else source}", weights_sha256=sha)
        return cls(model, image_processor, tokenizer, info, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return pixels[0]  # (3, H, W)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 3, H, W) -> B captions; a caption that decodes to nothing stays ``""``."""
        if pixels.shape[0] == 0:
            return []
        generate: dict[str, Any] = {
            "num_beams": options.beam_size,
            "max_new_tokens": options.max_len + TOKEN_SLACK,
            "do_sample": False,  # a model's generation_config may ask for sampling
        }
        if options.no_repeat_ngram_size is not None:  # None: the model's generation_config decides
            generate["no_repeat_ngram_size"] = options.no_repeat_ngram_size
        if options.beam_size > 1:  # only beam search uses it; greedy would warn that it is ignored
            generate["length_penalty"] = options.length_penalty
        ids = self.model.generate(pixel_values=pixels.to(self.device, torch.float32), **generate)  # (B, T)
        return [" ".join(text.split()) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _load_failure(spec: str, folder: Path | None, cache_dir: str | None, offline: bool, exc: BaseException) -> str:
    """The message of a :class:`ModelLoadError`: what was asked, where we looked, how to fix it."""
    reason = str(exc).strip().rstrip(". ") or type(exc).__name__
    if folder is not None:
        return (
            f"could not load Hugging Face captioner 'hf:{spec}' from the folder {folder}: {reason}. "
            f"The folder must hold what save_pretrained writes for the model, its tokenizer and its "
            f"image processor (config.json, the weights, tokenizer files, preprocessor_config.json)"
        )
    where = cache_dir or "the default Hugging Face cache ($HF_HOME/hub)"
    mode = "offline, so nothing was downloaded; " if offline else ""
    return (
        f"could not load Hugging Face captioner 'hf:{spec}' ({mode}cache dir: {where}): {reason}. "
        f"To get the model, run once online with the same cache dir, or pass a local folder "
        f"written by save_pretrained as 'hf:/path/to/folder'"
    )
