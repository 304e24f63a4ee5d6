"""HFCaptioner and CocaCaptioner against tiny random-initialised models built here; never touches the network.

The HF models (BLIP, VisionEncoderDecoder ViT+GPT-2, GIT) and the CoCa model are a few million
parameters with 32-pixel images, so their captions are gibberish: the tests check the plumbing
against oracles (transformers' ``generate`` and a hand-written greedy loop over CoCa's forward),
never the words.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip  # declared dependencies: fail loudly if they are missing
import transformers
from captioning.captioner import CaptionerInfo, DecodeOptions
from captioning.factory import create_captioner
from captioning.coca_captioner import clean_caption
from captioning.hf_captioner import TOKEN_SLACK, weights_sha256
from conftest import register_open_clip_config
from retrieval.errors import InputError, ModelLoadError

WORDS = "a the dog cat on in red blue car man woman beach grass sits runs with of and".split()
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
COCA = "coca_tiny-test"
COCA_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 9, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread for this module, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: refuse and record connections


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), mode="L")
    return [rgb, grey, Image.new("RGB", (50, 30), (200, 10, 10))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spread_weights(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Redraw every weight matrix from N(0, std). Default initialisations are so small (CoCa's output
    projection is even all zeros) that a tiny model writes the same caption for every image, which
    would let a mix-up between the images of a batch go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


# --- tiny Hugging Face models ------------------------------------------------------------------

def bert_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """BLIP and GIT use a BERT WordPiece tokenizer; BLIP starts captions with its ``[DEC]`` token."""
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}, bos_token="[DEC]")


def tiny_vision(**extra: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=8, **extra)


def build_blip(folder: Path) -> None:
    tok = bert_tokenizer()
    cfg = transformers.BlipConfig(
        vision_config=tiny_vision(projection_dim=32),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id,
                         sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, projection_dim=32),
        projection_dim=32, image_text_hidden_size=32,
    )
    spread_weights(transformers.BlipForConditionalGeneration(cfg), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def build_git(folder: Path) -> None:
    tok = bert_tokenizer()
    cfg = transformers.GitConfig(
        vision_config=tiny_vision(projection_dim=32), vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
    )
    spread_weights(transformers.GitForCausalLM(cfg), seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)


def build_vision_encoder_decoder(folder: Path) -> None:
    """ViT encoder + GPT-2 decoder (as nlpconnect/vit-gpt2-image-captioning), byte-level GPT-2 tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}  # the 256 byte symbols
    end = vocab["<|endoftext|>"] = len(vocab)
    tok = transformers.GPT2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    decoder = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      add_cross_attention=True, bos_token_id=end, eos_token_id=end, pad_token_id=end)
    encoder = transformers.ViTConfig(**tiny_vision())
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = end
    spread_weights(transformers.VisionEncoderDecoderModel(config=cfg), seed=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


BUILDERS = {"blip": build_blip, "vision-encoder-decoder": build_vision_encoder_decoder, "git": build_git}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    """model_type -> a save_pretrained folder holding a tiny model, its tokenizer and image processor."""
    root = tmp_path_factory.mktemp("hf-models")
    folders = {}
    for model_type, build in BUILDERS.items():
        folders[model_type] = root / model_type
        build(folders[model_type])
    return folders


def generate_oracle(folder: Path, ims: list[Image.Image], options: DecodeOptions) -> list[str]:
    """Captions straight from transformers: image processor -> model.generate -> batch_decode."""
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = {"blip": transformers.BlipForConditionalGeneration, "git": transformers.GitForCausalLM,
           "vision-encoder-decoder": transformers.VisionEncoderDecoderModel}[config.model_type]
    model = cls.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pixels = processor(images=[im.convert("RGB") for im in ims], return_tensors="pt")["pixel_values"]
    extra = {"length_penalty": options.length_penalty} if options.beam_size > 1 else {}
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, num_beams=options.beam_size, do_sample=False,
                             max_new_tokens=options.max_len + TOKEN_SLACK,
                             no_repeat_ngram_size=options.no_repeat_ngram_size, **extra)
    return [" ".join(text.split()) for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize("model_type", list(BUILDERS))
def test_hf_captions_match_generate(model_type: str, hf_folders: dict[str, Path]) -> None:
    folder = hf_folders[model_type]
    cap = create_captioner(f"hf:{folder}")
    assert type(cap.model).__name__ == transformers.AutoConfig.from_pretrained(folder).architectures[0]
    assert not cap.model.training and cap.device == torch.device("cpu")
    assert cap.preprocess(images()[1]).shape == (3, 32, 32)  # greyscale is converted to RGB
    for beam in (1, 3):
        options = DecodeOptions(beam_size=beam, max_len=6, length_penalty=0.7)
        got = cap.caption_images(images(), options)
        assert len(got) == 3 and all(isinstance(c, str) for c in got)
        assert len(set(got)) > 1  # the images matter
        assert got == generate_oracle(folder, images(), options)
        if model_type != "vision-encoder-decoder":  # BERT vocabulary: only real words, no specials
            assert all(set(c.split()) <= set(WORDS) for c in got)
    assert cap.caption_images([]) == []


def test_hf_decode_options_are_honoured(hf_folders: dict[str, Path]) -> None:
    cap = create_captioner(f"hf:{hf_folders['git']}")
    pixels = torch.stack([cap.preprocess(im) for im in images()])
    long = cap.caption_pixels(pixels, DecodeOptions(beam_size=1, max_len=12))
    assert any(len(set(c.split())) < len(c.split()) for c in long)  # this tiny model repeats itself ...
    for c in cap.caption_pixels(pixels, DecodeOptions(beam_size=1, max_len=12, no_repeat_ngram_size=1)):
        assert len(set(c.split())) == len(c.split())  # ... and stops when repeats are banned
    for c in cap.caption_pixels(pixels, DecodeOptions(beam_size=2, max_len=1)):
        assert len(c.split()) <= 1 + TOKEN_SLACK
    # bad options never reach a captioner: DecodeOptions refuses them when made (test_decode_options_validate)


def test_hf_empty_caption_stays_empty(hf_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only special tokens decode to "": returned as it is (the indexer stores no caption), not padded out."""
    cap = create_captioner(f"hf:{hf_folders['blip']}")
    tok = cap.tokenizer
    dec, sep, pad = tok.convert_tokens_to_ids("[DEC]"), tok.sep_token_id, tok.pad_token_id
    ids = torch.tensor([[dec, sep, pad], [dec, tok.convert_tokens_to_ids("dog"), sep]])
    monkeypatch.setattr(cap.model, "generate", lambda **kwargs: ids)
    assert cap.caption_images(images()[:2]) == ["", "dog"]


def test_hf_info_names_the_folder_and_hashes_its_weights(
    hf_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    blip, git = hf_folders["blip"], hf_folders["git"]
    a = create_captioner(f"hf:{blip}")
    assert a.info == CaptionerInfo(name=f"hf:{blip}", weights_sha256=sha256(blip / "model.safetensors"))
    b = create_captioner(f"hf:{git}")
    assert b.info.weights_sha256 == sha256(git / "model.safetensors")
    assert a.info.fingerprint != b.info.fingerprint
    monkeypatch.chdir(blip.parent)
    assert create_captioner("hf:./blip").info == a.info  # relative and absolute paths agree


def hub_cache(cache: Path, repo: str, folder: Path) -> str:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs, a snapshot of symlinks, refs/main."""
    commit = "c0ffee" + "0" * 34
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        data = file.read_bytes()
        lfs = file.suffix in (".safetensors", ".bin")  # LFS blobs are named by sha256, the rest by git sha1
        blob = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (repo_dir / "snapshots" / commit / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return sha256(folder / "model.safetensors")


def test_hf_offline_hub_id_loads_from_cache(hf_folders: dict[str, Path], tmp_path: Path, no_network: list) -> None:
    cache = tmp_path / "hub-cache"
    want = hub_cache(cache, "pixquery-test/tiny-blip", hf_folders["blip"])
    cap = create_captioner("hf:pixquery-test/tiny-blip", cache_dir=cache, offline=True)
    assert cap.info == CaptionerInfo(name="hf:pixquery-test/tiny-blip", weights_sha256=want)
    assert len(cap.caption_images(images(), DecodeOptions(beam_size=1, max_len=3))) == 3
    assert no_network == []


def test_hf_offline_uncached_fails_fast_without_network(tmp_path: Path, no_network: list) -> None:
    cache = tmp_path / "empty-cache"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        create_captioner("hf:Salesforce/blip-image-captioning-base", cache_dir=cache, offline=True)
    assert time.monotonic() - start < 15
    assert no_network == []
    message = str(err.value)
    assert "Salesforce/blip-image-captioning-base" in message and str(cache) in message and "online" in message


def test_hf_missing_or_unusable_folder(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_captioner(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"from the folder .*empty: .*config\.json"):
        create_captioner(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        create_captioner(f"hf:{tmp_path / 'file.bin'}")
    clip = tmp_path / "clip"
    transformers.CLIPConfig().save_pretrained(clip)
    with pytest.raises(ModelLoadError, match="'clip' model"):
        create_captioner(f"hf:{clip}")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for file in hf_folders["blip"].iterdir():
        if file.name != "model.safetensors":
            (no_weights / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ModelLoadError, match="no-weights"):
        create_captioner(f"hf:{no_weights}")


@pytest.mark.parametrize("name", ["hf:", "hf: ", "hf:org/", "hf:bad name", "hf:org/na me", "hf:org/a..b"])
def test_hf_malformed_spec(name: str) -> None:
    with pytest.raises(InputError):
        create_captioner(name)


def test_sharded_weights_hash(tmp_path: Path) -> None:
    """A sharded model is hashed from its shards' names and hashes, so any shard change shows."""
    shards = {"model-00001-of-00002.safetensors": b"one", "model-00002-of-00002.safetensors": b"two"}
    for name, data in shards.items():
        (tmp_path / name).write_bytes(data)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    lines = "".join(f"{n} {hashlib.sha256(d).hexdigest()}\n" for n, d in sorted(shards.items()))
    assert weights_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"TWO")
    assert weights_sha256(tmp_path) != hashlib.sha256(lines.encode()).hexdigest()


# --- tiny open_clip CoCa ---------------------------------------------------------------------------

@pytest.fixture
def coca_arch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Register the tiny CoCa config with open_clip for this test only."""
    return register_open_clip_config(monkeypatch, tmp_path, COCA, COCA_CFG)


def make_coca_checkpoint(path: Path, seed: int) -> Path:
    model = spread_weights(open_clip.create_model(COCA, pretrained=None), seed=seed)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def coca_ckpt(coca_arch: str, tmp_path: Path) -> Path:
    return make_coca_checkpoint(tmp_path / "coca.pt", seed=0)


def greedy_oracle(ckpt: Path, ims: list[Image.Image], max_tokens: int) -> list[str]:
    """Greedy decoding written out over CoCa's public forward: at each step the arg-max token, with
    ``<start_of_text>`` never generated, ``<end_of_text>`` not as the first token and forced at the end."""
    model, _, preprocess = open_clip.create_model_and_transforms(COCA, pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer(COCA)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    model.eval()
    captions = []
    for im in ims:
        pixels = preprocess(im)[None]  # (1, 3, H, W)
        tokens = [sot]
        with torch.no_grad():
            for t in range(max_tokens + 1):
                logits = model(pixels, torch.tensor([tokens]), output_labels=False)["logits"][0, -1]  # (V,)
                logits[sot] = float("-inf")
                if t == 0:
                    logits[eot] = float("-inf")
                nxt = eot if t == max_tokens else int(logits.argmax())
                if nxt == eot:
                    break
                tokens.append(nxt)
        captions.append(clean_caption(tokenizer.decode(tokens[1:])))
    return captions


def test_coca_greedy_matches_forward_oracle(coca_ckpt: Path) -> None:
    cap = create_captioner(f"openclip:{COCA}/{coca_ckpt}")
    assert cap.preprocess(images()[1]).shape == (3, 32, 32)
    got = cap.caption_images(images(), DecodeOptions(beam_size=1, max_len=5))
    assert got == greedy_oracle(coca_ckpt, images(), max_tokens=5 + TOKEN_SLACK)
    assert all(isinstance(c, str) and c for c in got) and len(set(got)) > 1
    # at the default length the budget is capped by the context (16 positions = <sot> + 15 tokens)
    long = cap.caption_images(images(), DecodeOptions(beam_size=1, max_len=40))
    assert long == greedy_oracle(coca_ckpt, images(), max_tokens=15)


def test_coca_beam_search(coca_ckpt: Path) -> None:
    cap = create_captioner(f"openclip:{COCA}/{coca_ckpt}")
    pixels = torch.stack([cap.preprocess(im) for im in images()])
    for options in (DecodeOptions(beam_size=3, max_len=5),
                    DecodeOptions(beam_size=3, max_len=5, no_repeat_ngram_size=1)):
        got = cap.caption_pixels(pixels, options)
        assert len(got) == 3 and all(isinstance(c, str) and c for c in got) and len(set(got)) > 1
        assert got == [cap.caption_pixels(p[None], options)[0] for p in pixels]  # batching changes nothing
    assert cap.caption_pixels(pixels[:0]) == []
    assert not cap.model.training


def test_coca_info(coca_ckpt: Path, tmp_path: Path) -> None:
    other = make_coca_checkpoint(tmp_path / "other.pt", seed=1)
    a = create_captioner(f"openclip:{COCA}/{coca_ckpt}")
    b = create_captioner(f"openclip:{COCA}/{other}")
    assert a.info == CaptionerInfo(name=f"openclip:{COCA}/{coca_ckpt}", weights_sha256=sha256(coca_ckpt))
    assert b.info.weights_sha256 == sha256(other) and a.info.fingerprint != b.info.fingerprint


@pytest.mark.parametrize(
    "name", ["openclip:coca_ViT-B-32", "openclip:coca_ViT-B-32/", "openclip:/x", "openclip:ViT-B-32/laion2b_s34b_b79k"]
)
def test_coca_malformed_or_not_coca(name: str) -> None:
    with pytest.raises(InputError):
        create_captioner(name)


def test_coca_missing_checkpoint_and_unknown_architecture(coca_arch: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_captioner(f"openclip:{COCA}/{tmp_path / 'nope.pt'}")
    with pytest.raises(ModelLoadError, match=r"list_models\(\)"):
        create_captioner("openclip:coca_NoSuchNet/mscoco_finetuned_laion2b_s13b_b90k")


def test_coca_offline_uncached_fails_fast_without_network(tmp_path: Path, no_network: list) -> None:
    spec = "coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k"
    cache = tmp_path / "empty-cache"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        create_captioner(f"openclip:{spec}", cache_dir=cache, offline=True)
    assert time.monotonic() - start < 15
    assert no_network == []
    message = str(err.value)
    assert spec in message and str(cache) in message and "online" in message


def test_clean_caption() -> None:
    assert clean_caption("<start_of_text>a dog 's ball on the  beach . <end_of_text>!!") == "a dog's ball on the beach."
    assert clean_caption("two cats , one dog ") == "two cats, one dog"
    assert clean_caption("") == ""


@pytest.mark.parametrize("bad", [dict(beam_size=0), dict(beam_size=2.5), dict(beam_size=21), dict(max_len=0),
                                 dict(max_len=101), dict(no_repeat_ngram_size=-1), dict(length_penalty=float("nan")),
                                 dict(length_penalty=float("inf"))])
def test_decode_options_validate(bad):
    with pytest.raises(InputError):
        DecodeOptions(**bad)
    assert DecodeOptions(beam_size=1, max_len=1, no_repeat_ngram_size=0, length_penalty=0.0).beam_size == 1
