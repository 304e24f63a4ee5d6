"""The API's endpoints (mounted under ``/api`` by ``indexer/api/app.py``). Each is a plain function that
calls the Engine; FastAPI runs them on its thread pool, so searches run concurrently."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException

from indexer.api.schemas import CaptionOut, FiltersIn, Hit, ImageOut, IndexIn, Mode, SearchIn, SearchOut
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.media import ImageUnavailable, UploadTooLarge, check_upload, indexed_bytes, indexed_file, save_upload
from indexer.search.searcher import SearchHit
from indexer.storage.filters import Filters
from indexer.thumbnails import PREVIEW_SIZE, THUMB_SIZE, thumbnail
from pydantic import BeforeValidator

from retrieval.query import SIGNALS, FusionWeights

router = APIRouter()
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
               "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff"}


def _digits_only(value: object) -> object:
    """Ids from a URL are ASCII decimal digits, nothing else (no sign, exponent or other scripts' digits),
    as the app's ``parse_image_id`` takes them."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("an image id is ASCII decimal digits")
    return value


ImageId = Annotated[int, BeforeValidator(_digits_only),
                    Path(ge=0, le=2**62, description="the image's id in the index (see search results)")]


def _state(request: Request):  # noqa: ANN202 - indexer.api.app.ApiState
    return request.app.state.pixquery


def _engine(request: Request) -> Engine:
    return _state(request).current()


def _weights(given: dict[str, float] | None) -> FusionWeights:
    unknown = sorted(set(given or {}) - set(SIGNALS))
    if unknown:
        raise InputError(f"unknown weight {unknown[0]!r}; the signals are: {', '.join(SIGNALS)}")
    return FusionWeights(**(given or {}))


def _filters(given: FiltersIn | None, where: list[str] | None = None) -> Filters:
    given = given or FiltersIn()
    return Filters(folder=given.folder, glob=given.glob, after=given.after, before=given.before,
                   file_types=tuple(given.file_types), min_width=given.min_width, min_height=given.min_height,
                   where=tuple(given.where) + tuple(where or ()))


def _results(engine: Engine, hits: list[SearchHit], explanations: list | None = None) -> list[Hit]:
    metadata = engine.catalogue.values([h.id for h in hits]) if hits else {}
    reasons = {e.id: e.text for e in explanations or ()}
    return [Hit(**h.to_dict(), explanation=reasons.get(h.id), metadata=metadata.get(h.id, {})) for h in hits]


def _check_k(request: Request, k: int) -> None:
    if k > _state(request).settings.max_k:
        raise InputError(f"k is at most {_state(request).settings.max_k}")


# --- search ---------------------------------------------------------------------------------------------
@router.post("/search", response_model=SearchOut, summary="Search by text (and relevance feedback)")
def search(body: SearchIn, request: Request) -> SearchOut:
    _check_k(request, body.k)
    engine = _engine(request)
    weights, filters = _weights(body.weights), _filters(body.filters)
    hits = engine.search(body.query, k=body.k, mode=body.mode, weights=weights,
                         filters=filters if filters.active else None, threshold=body.threshold,
                         positive_ids=body.positive_ids, negative_ids=body.negative_ids)
    explanations = (engine.explain(hits, body.query, body.mode, filters, body.positive_ids, body.negative_ids)
                    if body.explain else None)
    return SearchOut(query=body.query, mode=body.mode, k=body.k, weights=weights.to_dict(),
                     filters=filters.describe(), results=_results(engine, hits, explanations))


def _upload(request: Request, file: UploadFile) -> bytes:
    limit = _state(request).settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the uploaded file is over the limit of {limit / 1e6:.0f} MB")
    return data


@router.post("/search/image", response_model=SearchOut, summary="Search by an uploaded example image")
def search_image(request: Request, file: UploadFile = File(..., description="a JPEG, PNG, WebP, GIF, BMP or TIFF"),
                 query: str | None = Form(None, max_length=2000, description="words to combine with the image"),
                 k: int = Form(10, ge=1, le=1000), mode: Mode = Form("fused"),
                 where: list[str] = Form([], description="catalogue conditions, e.g. price<50"),
                 threshold: float | None = Form(None), explain: bool = Form(False)) -> SearchOut:
    _check_k(request, k)
    engine = _engine(request)
    data = _upload(request, file)
    settings = _state(request).settings
    check_upload(data, settings.max_upload_bytes, settings.max_upload_pixels)
    kept = save_upload(data, engine.config.cache_dir / "uploads")
    filters = _filters(None, where)
    hits = engine.search(query or None, image=kept, k=k, mode=mode, filters=filters if filters.active else None,
                         threshold=threshold)
    explanations = engine.explain(hits, query or None, mode, filters) if explain else None
    return SearchOut(query=query or None, mode=mode, k=k, weights=FusionWeights().to_dict(),
                     filters=filters.describe(), results=_results(engine, hits, explanations))


@router.get("/images/{image_id}/similar", response_model=SearchOut, summary="Images most like an indexed image")
def similar(request: Request, image_id: ImageId, k: int = Query(10, ge=1, le=1000),
            where: list[str] = Query([], description="catalogue conditions, e.g. category=shoes")) -> SearchOut:
    _check_k(request, k)
    engine = _engine(request)
    if engine.image(image_id) is None:
        raise HTTPException(404, f"no image with id {image_id} in the index")
    filters = _filters(None, where)
    hits = engine.more_like_this(image_id, k=k, filters=filters if filters.active else None)
    return SearchOut(query=None, mode="image", k=k, weights={"image": 1.0}, filters=filters.describe(),
                     results=_results(engine, hits))


@router.post("/caption", response_model=CaptionOut, summary="Caption an uploaded image (nothing is indexed)")
def caption(request: Request, file: UploadFile = File(...)) -> CaptionOut:
    engine = _state(request).engine
    settings = _state(request).settings
    image = check_upload(_upload(request, file), settings.max_upload_bytes, settings.max_upload_pixels)
    captioner = engine.captioner
    if captioner is None:
        raise InputError("this server has no captioner (it was started with captions switched off)")
    text = captioner.caption_images([image], engine.config.decode)[0]
    return CaptionOut(caption=text, captioner=captioner.info.name)


# --- images -----------------------------------------------------------------------------------------------
@router.get("/images/{image_id}", response_model=ImageOut, summary="What the index holds about an image")
def image_info(request: Request, image_id: ImageId) -> ImageOut:
    engine = _engine(request)
    row = engine.image(image_id)
    if row is None:
        raise HTTPException(404, f"no image with id {image_id} in the index")
    described = engine.describe([row.id])[0].to_dict()
    return ImageOut(id=row.id, path=row.path, caption=row.caption, captioner=row.captioner, width=row.width,
                    **{k: described[k] for k in ("caption_confidence", "caption_is_confident", "tags", "tagged",
                                                 "alt_text")},
                    height=row.height, file_type=row.file_type, byte_size=row.byte_size,
                    content_hash=row.content_hash, taken_at=row.taken_at.isoformat() if row.taken_at else None,
                    modified_at=row.mtime, indexed_at=row.indexed_at.isoformat() if row.indexed_at else None,
                    metadata=engine.catalogue.values([row.id]).get(row.id, {}),
                    links={"file": f"/api/images/{row.id}/file", "thumbnail": f"/api/images/{row.id}/thumbnail",
                           "similar": f"/api/images/{row.id}/similar"})


def _indexed(engine: Engine, image_id: int) -> tuple:
    try:
        return indexed_file(engine, image_id)
    except ImageUnavailable:
        raise
    except InputError:
        raise HTTPException(404, f"no image with id {image_id} in the index") from None


@router.get("/images/{image_id}/file", summary="The image file itself", response_class=Response)
def image_file(request: Request, image_id: ImageId) -> Response:
    """The file's bytes, only while they are the content that was indexed (a file replaced, or a link
    pointed elsewhere, since indexing is 410 Gone, never someone else's bytes)."""
    row, path = _indexed(_engine(request), image_id)
    data = indexed_bytes(path, row.content_hash, row.byte_size)
    return Response(data, media_type=MEDIA_TYPES.get(row.file_type, "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=3600"})


@router.get("/images/{image_id}/thumbnail", summary="A small JPEG of the image", response_class=FileResponse)
def image_thumbnail(request: Request, image_id: ImageId,
                    size: int = Query(THUMB_SIZE, description=f"{THUMB_SIZE} (4:3 crop) or {PREVIEW_SIZE} (preview)")
                    ) -> FileResponse:
    if size not in (THUMB_SIZE, PREVIEW_SIZE):
        raise InputError(f"size is {THUMB_SIZE} or {PREVIEW_SIZE}")
    engine = _engine(request)
    row, path = _indexed(engine, image_id)
    thumb = thumbnail(engine.config.cache_dir, path, row.content_hash, size, byte_size=row.byte_size)
    return FileResponse(thumb, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


# --- the index ----------------------------------------------------------------------------------------------
@router.get("/status", summary="Whether there is an index, its size, and the indexing run")
def status(request: Request) -> dict:
    state = _state(request)
    engine = state.engine
    job = state.jobs.current
    out = {"index": engine.exists, "images": 0, "generation": None,
           "indexing": job.to_dict() if job is not None else None}
    if engine.exists:
        out["images"] = engine.stats()["images"]
        out["generation"] = engine.generation
    return out


@router.get("/stats", summary="What is in the index: counts, models, catalogue fields, last run")
def stats(request: Request) -> dict:
    engine = _state(request).engine
    return {**engine.stats(), "catalogue_fields": engine.catalogue.fields()}


@router.get("/meta/fields", summary="The imported catalogue fields and their types")
def meta_fields(request: Request) -> list[dict]:
    return _state(request).engine.catalogue.fields()


@router.get("/index/folders", summary="The folders this server may index")
def index_folders(request: Request) -> list[str]:
    return [str(f) for f in _state(request).settings.index_folders]


@router.post("/index", status_code=202, summary="Start indexing one of the configured folders")
def start_index(body: IndexIn, request: Request) -> dict:
    state = _state(request)
    folder = state.settings.index_folder(body.folder)
    if folder is None:
        allowed = ", ".join(str(f) for f in state.settings.index_folders) or "none (start the server with --index-folder)"
        raise HTTPException(403, f"this server indexes only the folders it was started with: {allowed}")
    return state.jobs.start(str(folder), rebuild=body.rebuild).to_dict()


@router.get("/index/job", summary="Progress of the current (or last) indexing run")
def index_job(request: Request) -> dict:
    job = _state(request).jobs.current
    if job is None:
        raise HTTPException(404, "no indexing run has been started on this server")
    return job.to_dict()

