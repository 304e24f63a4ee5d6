"""The weight files pixquery ships inside its packages: one registry, read by the configuration's
defaults, the command line's help, the loaders and the training commands.

Light on purpose (no torch): ``pixquery --help`` reads it. A test checks every file's sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ModelLoadError

ROOT = Path(__file__).resolve().parent.parent  # the folder holding the packages

KINDS = {  # what reads a kind of weight file, and the command that writes one
    "encoder": ("native encoder heads", "pixquery train encoder"),
    "captioner": ("native captioner", "pixquery train captioner"),
    "rater": ("rater", "pixquery train rater"),
    "matcher": ("match head", "pixquery train matcher"),
    "tagger": ("tagger", "pixquery train tagger"),
    "confidence": ("caption confidence model", "pixquery train confidence"),
}


@dataclass(frozen=True)
class Shipped:
    name: str  # as written after "native:", e.g. "effl0-sat-v4"
    kind: str  # one of KINDS
    package: str  # the package folder the file ships in
    sha256: str
    summary: str

    @property
    def path(self) -> Path:
        return ROOT / self.package / "weights" / f"{self.name}.pt"


SHIPPED = (
    Shipped("effl0-minilm-v1", "encoder", "retrieval/native",
            "6f4813c7b829b84d08522898e80713f168aa3ad431f5c5d8fdca9e70eabeae33",
            "projection heads over EfficientNet-Lite0 and MiniLM, trained on Flickr8k train (4-member ensemble)"),
    Shipped("effl0-sat-v4", "captioner", "captioning",
            "16a7e07fe2f3871b143dbc4fe7d5afae0bb4ba1c0952d5e2dc2ef3cb54f7f042",
            "attention decoder: the average of the weights of a self-critical and a cross-entropy decoder"),
    Shipped("effl0-sat-v1", "captioner", "captioning",
            "3332e3f5ad66e1d999f549d0de8139fd75b32850567dc40d3823e9a2ece5342f",
            "attention decoder trained with cross-entropy (the caption scorer of fused ranking)"),
    Shipped("effl0-sat-v1-rater1", "rater", "captioning",
            "a89db66047ebd5b6272cac87695c409c706c041c1302d9af433a63c82659561b",
            "one decoder layer distilled from effl0-sat-v1, reading its memories: rates query text at about a "
            "third of the scorer's cost, 1.3 points of fused R@1 lower on Flickr8k dev (opt-in: PIXQUERY_RATER)"),
    Shipped("effl0-match-v1", "matcher", "retrieval/native",
            "58ad18e5127734b8ee4c5d1bc6c8972c0bac2be969faf984f30e14f4f0f3dab8",
            "match head over the scorer effl0-sat-v1's memories and MiniLM token states"),
    Shipped("imagenet-tags-v1", "tagger", "retrieval/native",
            "1c0ea425cebe63859143abc2aacbf858600b922d2b97456d042397121a234858",
            "tags from the image tower's ImageNet-1k classifier, calibrated on Flickr8k train; class-name "
            "embeddings for the zero-shot signal"),
    Shipped("caption-confidence-v1", "confidence", "captioning",
            "50963feaf37b73dfd278f2eedc32979e04a1d66e7a27f63b64f396a1392e7cc0",
            "how sure a caption of effl0-sat-v4 is: logistic regression fitted on Flickr8k train only (threshold "
            "0.5 fixed in advance; optimistic on new photos)"),
)

# role -> the model a new index uses for it (None in the configuration switches a role off)
DEFAULTS = {
    "encoder": "native:effl0-minilm-v1",
    "captioner": "native:effl0-sat-v4",
    "scorer": "native:effl0-sat-v1",  # the native captioner that rates query text against images
    "matcher": "native:effl0-match-v1",
    "tagger": "native:imagenet-tags-v1",  # tags and the zero-shot signal (the image tower's ImageNet classifier)
    "confidence": "native:caption-confidence-v1",  # how sure each caption is
}


def shipped(kind: str, name: str) -> Shipped | None:
    return next((s for s in SHIPPED if s.kind == kind and s.name == name), None)


def names(kind: str) -> list[str]:
    return [s.name for s in SHIPPED if s.kind == kind]


def resolve_weights(spec: str, kind: str) -> Path:
    """``spec`` is the name of a shipped file of ``kind`` or a path to one (a ``.pt`` file made by the
    kind's training command)."""
    what, command = KINDS[kind]
    candidate = Path(spec).expanduser()
    if candidate.suffix == ".pt" or candidate.is_file():
        if not candidate.is_file():
            raise ModelLoadError(f"{what} weights {candidate} do not exist")
        return candidate
    entry = shipped(kind, spec)
    if entry is None:
        raise ModelLoadError(f"unknown {what} {spec!r}; shipped: {', '.join(names(kind)) or 'none'} "
                             f"(or give the path of a file made by '{command}')")
    if not entry.path.is_file():
        raise ModelLoadError(f"the shipped {what} {spec} is missing from this installation ({entry.path})")
    return entry.path


def is_shipped(path: Path) -> str | None:
    """The shipped name of ``path`` (None for a user's own file): what provenance records."""
    resolved = path.resolve()
    return next((s.name for s in SHIPPED if s.path.resolve() == resolved), None)
