"""The ASGI app of ``r2 serve``: the page (plain HTML/JS/CSS from the package) and its JSON API.

=======================================  ==========================================================
``GET /api/health``                      the model: checkpoint, dataset, backbone, device, limits
``GET /api/samples``                     the embedded sample videos, by name
``POST /api/videos``                     a video as the request body (its ``video/*`` type, the name
                                         in ``X-Filename``), or ``{"sample": name}`` as JSON: 202,
                                         the video (id, duration, clips) with encoding under way
``GET /api/videos/{id}``                 the video and its encoding progress; 422 once it failed
``GET /api/videos/{id}/file``            the video file, for the page's player (byte ranges)
``POST /api/predict``                    ``{"video_id", "sentences": [...]}``: one record per
                                         sentence, those of ``r2 predict --json``
=======================================  ==========================================================

Refusals are ``{"error": "<one sentence>"}`` with a 4xx status. Uploads must not carry a type an HTML
form can send (``text/plain``, forms), so another web site cannot post to this server unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from extract.config import sample_paths
from extract.frames import probe
from r2.predict_cli import submission_record
from r2.serve.encodings import Encodings
from r2.serve.errors import ApiError, too_large, too_long
from r2.serve.uploads import UploadFolder, Video, clean_name, file_digest
from shards.errors import VideoError

if TYPE_CHECKING:
    from r2.predict import Predictor

STATIC = Path(__file__).parent / "static"
MAX_SENTENCES = 32
MAX_SENTENCE_CHARS = 1000
FORM_TYPES = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
"""Request types a page of another site may post without asking (no CORS preflight); refused."""
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; media-src 'self'; object-src 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class _SecurityHeaders:
    """Adds :data:`HEADERS` to every HTTP answer: the page loads nothing from elsewhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(
    predictor: Predictor,
    model: str,
    max_upload_bytes: int = 500 * 10**6,
    max_seconds: float = 60 * 60,
    cache_bytes: int = 2 * 10**9,
    idle_s: float = 30 * 60,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The app, serving ``predictor``.

    Args:
        predictor: the model (its calls are made on one thread, one at a time).
        model: what ``/api/health`` calls the checkpoint (its file name).
        max_upload_bytes: largest upload, bytes (413 past it).
        max_seconds: longest video, seconds (413 past it).
        cache_bytes: most bytes of encoded tokens kept (least recently used evicted first).
        idle_s: seconds after which an unused video is forgotten and its upload removed.
        allowed_hosts: ``Host`` names answered (e.g. ``127.0.0.1``, ``localhost``: a foreign
            name pointed at this machine gets 400); ``None`` answers any.

    The upload folder is made when the app starts and removed when it stops.
    """
    samples = {path.name: path for path in sorted(sample_paths()[0].glob("*.mp4"))}
    state: dict[str, Any] = {}

    def folder() -> UploadFolder:
        return state["folder"]

    def encodings() -> Encodings:
        return state["encodings"]

    def video_json(video: Video) -> dict[str, Any]:
        progress = encodings().progress[video.digest]
        ready = encodings().cached(video.digest) or (progress.finished and progress.error is None)
        return {
            "id": video.id,
            "name": video.name,
            "duration": video.duration,
            "fps": predictor.fps,
            "clips": progress.total,
            "url": f"/api/videos/{video.id}/file",
            "state": "failed" if progress.error else "ready" if ready else "encoding",
            "done": progress.done,
            "total": progress.total,
        }

    async def health(request: Request) -> Response:
        backbone = predictor.backbone
        return JSONResponse(
            {
                "status": "ok",
                "model": model,
                "dataset": predictor.grounder.cfg.dataset,
                "backbone": backbone.name,
                "pretrained": backbone.pretrained,
                "layers": backbone.layers,
                "fps": predictor.fps,
                "device": str(backbone.device),
                "max_upload_mb": max_upload_bytes / 1e6,
                "max_minutes": max_seconds / 60,
            }
        )

    async def list_samples(request: Request) -> Response:
        return JSONResponse({"samples": [{"name": name} for name in samples]})

    async def add_video(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            name = (await _json(request)).get("sample")
            if not isinstance(name, str) or name not in samples:
                choices = ", ".join(samples)
                raise ApiError(404, f"There is no embedded sample {name!r}: choose one of {choices}.")
            path = samples[name]
            return await admit(name, path, await run_in_threadpool(file_digest, path), owned=False)
        if kind in FORM_TYPES:
            raise ApiError(
                415, "Send the video file itself as the request body, with its type (video/... or "
                "application/octet-stream)."
            )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_upload_bytes:
            raise ApiError(413, too_large(max_upload_bytes))
        name = clean_name(unquote(request.headers.get("x-filename", "")))  # encodeURIComponent
        path, digest = await folder().receive(request.stream(), max_upload_bytes)
        try:
            return await admit(name, path, digest, owned=True)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    async def admit(name: str, path: Path, digest: str, owned: bool) -> Response:
        """Check a received file is a video within the limits, register it and start encoding it."""
        try:
            info = await run_in_threadpool(probe, path)
        except VideoError as err:
            raise ApiError(415, _sentence(str(err).replace(str(path), name))) from None
        if info.duration is not None and info.duration > max_seconds:
            raise ApiError(413, too_long(name, max_seconds, info.duration))
        try:
            await run_in_threadpool(predictor.check_video, path)
        except VideoError as err:
            raise ApiError(422, _sentence(str(err).replace(str(path), name))) from None
        video = folder().add(name, path, digest, info.duration, owned)
        total = None if info.duration is None else round(info.duration * predictor.fps)
        encodings().start(digest, path, name, total)
        return JSONResponse(video_json(video), status_code=202)

    async def get_video(request: Request) -> Response:
        video = folder().get(request.path_params["video_id"])
        body = video_json(video)
        error = encodings().progress[video.digest].error
        if error is not None:
            return JSONResponse({**body, "error": _sentence(error)}, status_code=422)
        return JSONResponse(body)

    async def video_file(request: Request) -> Response:
        video = folder().get(request.path_params["video_id"])
        kind = mimetypes.guess_type(video.name)[0] or ""
        return FileResponse(video.path, media_type=kind if kind.startswith("video/") else "video/mp4")

    async def predict(request: Request) -> Response:
        body = await _json(request)
        video = folder().get(body.get("video_id"))
        sentences = _sentences(body.get("sentences"))
        try:
            encoded = await encodings().encoded(video.digest, video.path, video.name)
        except VideoError as err:
            raise ApiError(422, _sentence(str(err))) from None
        results = await encodings().run(lambda: [predictor.predict(encoded, s) for s in sentences])
        vid = Path(video.name).stem
        return JSONResponse(
            {
                "video_id": video.id,
                "duration": encoded.duration,
                "fps": encoded.fps,
                "records": [submission_record(i, vid, result) for i, result in enumerate(results)],
            }
        )

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["folder"] = UploadFolder(idle_s)
        state["encodings"] = Encodings(predictor, cache_bytes, max_seconds)
        sweeper = asyncio.create_task(_sweep_every(min(60.0, max(idle_s / 2, 0.05)), folder().sweep))
        try:
            yield
        finally:
            sweeper.cancel()
            encodings().close()
            folder().close()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/health", health),
            Route("/api/samples", list_samples),
            Route("/api/videos", add_video, methods=["POST"]),
            Route("/api/videos/{video_id}", get_video),
            Route("/api/videos/{video_id}/file", video_file),
            Route("/api/predict", predict, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[
            Middleware(_SecurityHeaders),
            *([Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return app


async def _sweep_every(seconds: float, sweep: Callable[[], object]) -> None:
    """Call ``sweep()`` every ``seconds`` until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        sweep()


async def _json(request: Request) -> dict[str, Any]:
    """The request's JSON object; :class:`ApiError` 400 when the body is not one."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _sentences(value: object) -> list[str]:
    """The sentences of a predict request; :class:`ApiError` 400 unless 1 to :data:`MAX_SENTENCES`
    non-blank strings of at most :data:`MAX_SENTENCE_CHARS` characters."""
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ApiError(400, "Give the sentences to ground as a list of strings in \"sentences\".")
    if len(value) > MAX_SENTENCES:
        raise ApiError(400, f"{len(value)} sentences is too many at once: give at most {MAX_SENTENCES}.")
    for i, sentence in enumerate(value, 1):
        if not sentence.strip():
            raise ApiError(400, f"Sentence {i} is empty: give the text to ground.")
        if len(sentence) > MAX_SENTENCE_CHARS:
            raise ApiError(400, f"Sentence {i} is longer than {MAX_SENTENCE_CHARS} characters.")
    return list(value)


def _sentence(message: str) -> str:
    """``message`` as one sentence for the page: ending with a full stop."""
    message = message.strip()
    return message if message.endswith((".", "!", "?")) else message + "."


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": _sentence(str(exc.detail))}, status_code=exc.status_code)
