"""The HTTP JSON API (``pixquery serve``): the same :class:`~indexer.engine.Engine` the CLI and the app use,
behind FastAPI. :func:`create_app` is the factory; the endpoints are in ``indexer/api/routes.py``.

Errors are JSON, ``{"detail": message, "error": type}``, with a status that says what went wrong:

    400 bad input (empty query, unknown weight, malformed catalogue filter, unknown marked id)
    401 no or wrong bearer token          403 a folder the server was not started with
    404 no such image, endpoint or job    409 no index yet, another encoder's index, a run already going
    410 an indexed file that is gone      413 an upload (or body) over the limit
    415 an upload that is not an image    422 a body that does not fit the schema
    503 a model that cannot be loaded     500 anything else (details only in the server log)

Images are only ever named by their index id; paths come from the index, never from a request.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import traceback
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from indexer.jobs import IndexJobs, JobRunning
from indexer.api.settings import ApiSettings
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import EncoderMismatchError, IndexCorruptError, IndexNotFoundError, InputError
from indexer.media import ImageUnavailable, UploadRejected, UploadTooLarge
from retrieval.errors import ModelLoadError, PixqueryError

log = logging.getLogger("pixquery.api")

# most specific first
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (UploadTooLarge, 413), (UploadRejected, 415), (JobRunning, 409), (EncoderMismatchError, 409),
    (IndexNotFoundError, 409), (ImageUnavailable, 410), (ModelLoadError, 503), (InputError, 400),
    (IndexCorruptError, 500), (PixqueryError, 500),
)


def status_of(exc: Exception) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit / 1e6:.0f} MB")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused (413) from its Content-Length, or
    cut off while it streams in, before anything buffers it."""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0
        started = False

        async def limited_receive():  # noqa: ANN202
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message) -> None:  # noqa: ANN001
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:  # noqa: ANN001
        await JSONResponse({"detail": BodyTooLarge(self.limit).detail, "error": "BodyTooLarge"}, 413)(
            {"type": "http"}, None, send)


class ServerTiming:
    """ASGI middleware: each response says how long the server spent on it (``Server-Timing: app;dur=ms``),
    so a client can tell the server's time from the network's and its own."""

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def timed_send(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1000
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"server-timing", f"app;dur={ms:.1f}".encode())]}
            await send(message)

        await self.app(scope, receive, timed_send)


class ApiState:
    """What every request shares: the serving Engine (models and index, loaded once), the settings and
    the indexing runs."""

    def __init__(self, engine: Engine, settings: ApiSettings, jobs: IndexJobs) -> None:
        self.engine, self.settings, self.jobs = engine, settings, jobs
        self._open_lock = threading.Lock()

    def current(self) -> Engine:
        """The Engine, its vectors reloaded (once, under a lock) when an indexing run committed since."""
        with self._open_lock:
            self.engine.open()
        return self.engine

    def warm_up(self) -> None:
        """Load the encoder, the vectors and the keyword statistics before the first request (a problem is
        logged, then reported by each request that needs them)."""
        try:
            if self.engine.exists:
                self.current()
                self.engine.encoder.encode_texts(["warm up"])
                self.engine.ranker()  # builds the scorer and the match head once, not in racing requests
                self.engine.warm_keywords()
        except PixqueryError as exc:
            log.warning("the index cannot be searched yet: %s", exc)


def create_app(engine: Engine | EngineConfig, settings: ApiSettings | None = None,
               job_engine: Callable[[], Engine] | None = None) -> FastAPI:
    """The API over ``engine`` (or an Engine built from a config). ``job_engine`` builds the Engine of
    each indexing run (default: the same config, sharing the serving Engine's models)."""
    from indexer.api import routes

    if isinstance(engine, EngineConfig):
        engine = Engine(engine)
    settings = settings or ApiSettings()
    serving = engine

    def default_job_engine() -> Engine:
        return Engine(serving.config, encoder=serving.encoder, captioner=serving.captioner, scorer=serving.scorer,
                      tagger=serving.tagger)

    state = ApiState(engine, settings, IndexJobs(job_engine or default_job_engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(state.warm_up)
        yield

    app = FastAPI(title="pixquery", version="1", lifespan=lifespan,
                  description="Search a photo collection in plain words, by example image, or by catalogue "
                              "fields; caption images; index configured folders. Images are named by their "
                              "index id. " + ("Every /api endpoint needs 'Authorization: Bearer <token>'."
                                              if settings.token else ""))
    app.state.pixquery = state
    bearer = HTTPBearer(auto_error=False, description="the server's PIXQUERY_API_TOKEN")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, settings.token.encode()):
            raise HTTPException(401, "a valid bearer token is required: 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    app.include_router(routes.router, prefix="/api", dependencies=[Depends(require_token)])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ServerTiming)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.exception_handler(PixqueryError)
    async def pixquery_error(_: Request, exc: PixqueryError) -> JSONResponse:
        code = status_of(exc)
        if code == 500:
            log.error("request failed:\n%s", "".join(traceback.format_exception(exc)))
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, code)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "error": "HTTPError"}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors), "error": "ValidationError"}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error:\n%s", "".join(traceback.format_exception(exc)))
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log",
                             "error": "InternalError"}, 500)

    return app
