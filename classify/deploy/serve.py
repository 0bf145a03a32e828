"""`maskcls serve MODEL`: the classifier over HTTP (FastAPI + uvicorn, the `maskcls[serve]` extra).

- `POST /predict`: multipart, field `file` (repeated for several photos) → `{"predictions": [...]}`, one
  object per photo in upload order: `filename`, crop `status`, `box`, face `score`, `class` (0-17),
  `name`, `probs` (18), per task the label and its probability, and a `warning` where the mask is worn
  incorrectly or not at all; beside them a `caution` when the model has not learned a task (as `predict`
  warns; also in /health, on the page and on the server's terminal). A bad request gets a 4xx
  `{"error": "..."}`; the server goes on.
- `GET /openapi.json`: the OpenAPI schema of these routes, /predict's multipart body and every answer
  included (schemathesis fuzzes the server against it in the tests).
- `GET /health`, and `GET /`: a page to drop or choose photos (or take one with the webcam) that shows
  the photo with the face box, the crop, and bars per task. It loads nothing from the internet.

The same cropping as `predict` (the model's detector settings and face prior, `faces.crop_lone_photos`),
the same eval transform and model (`OnnxModel`): a served answer equals `maskcls predict`'s for the
same photo. Requests are batched: photos that arrive within `wait_ms` of each other go through one
detector call and one model call, off the event loop; two such micro-batches run at once (`LANES`), each
with its own detector. Uploads are read into memory (at most
`max_bytes` a request) and never written to disk.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import queue
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from preprocess import labels as L
from preprocess.geometry import square_around, square_region
from preprocess.imageio import UnreadableImage, load_rgb, photo_size

from classify.inference.answer import answer, task_values
from classify.inference.card import cautions
from classify.inference.onnx_model import OnnxModel

MAX_BYTES = 10_000_000
MAX_FILES = 16
WAIT_MS = 5
LANES = 2                    # micro-batches that may run at once (Engine, Batcher)
MAX_PIXELS = 50_000_000      # decoded pixels in one request (a 131 KB PNG can decode to 119 MB)
SERVER_PIXELS = 150_000_000  # decoded pixels held by all requests at once; past it: 503, Retry-After
SERVER_BYTES_REQUESTS = 4      # request bodies buffered at once, in --max-bytes: past it a new body gets 503


class TaskValue(BaseModel):
    label: str = Field(description="the class's own part for this task (wear, male, <30, ...)")
    prob: float = Field(ge=0, le=1, description="the marginal probability of that part")


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    filename: str
    status: str = Field(description="how the face was found: ok, no_face, ... (as in a crop manifest)")
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 of the face in the photo")
    crop: list[int] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 (end exclusive) of the square "
                            "the model's crop was cut from: the face box and the model's crop margin, edges "
                            "replicated where it leaves the photo")
    score: float | None = Field(description="the detector's face score; null where no face was found")
    class_: int = Field(alias="class", ge=0, le=17, description="6*mask + 3*gender + age group")
    name: str
    probs: list[float] = Field(min_length=18, max_length=18)
    tasks: dict[str, TaskValue] = Field(description="mask, gender and age: the class's parts, never another class")
    warning: str | None = Field(None, description="present where the answer is a mask worn incorrectly or not at all; "
                                "it says so when the model has not learned mask")


CAUTION = ("present when the model has not learned a task (its validation was no better than always answering "
           "the most common label): that task's answers and probabilities say nothing")


class Predictions(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded photo, in upload order")
    caution: str | None = Field(None, description=CAUTION)


class Error(BaseModel):
    error: str


class Health(BaseModel):
    status: str
    models: list[str] = Field(description="the architecture of each model in the ensemble")
    img_size: int
    caution: str | None = Field(None, description=CAUTION)


def _upload_body(max_files: int) -> dict:
    """/predict's request body for the OpenAPI schema (the route parses the multipart body itself, so
    FastAPI cannot infer it)."""
    photos = {"type": "array", "minItems": 1, "maxItems": max_files,
              "items": {"type": "string", "format": "binary"},
              "description": "the photos (JPEG, PNG, WebP, BMP, TIFF or GIF), one part per photo"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": {"file": photos}}}}}}


_ERRORS = {400: "a photo that cannot be read, a form without 'file', too many photos",
           413: "over --max-bytes or --max-pixels", 415: "a body that is not multipart/form-data",
           503: "the server holds too many decoded pixels: retry after Retry-After seconds",
           500: "a bug of ours; the server goes on"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Engine:
    """Detection, cropping and the model for a batch of decoded photos. `lanes` batches may run at once,
    each in its own thread with its own detector (an OpenCV net is not safe to share between threads;
    onnxruntime's session is). A `detector` given runs alone: one lane."""

    def __init__(self, model: OnnxModel, detector=None, lanes: int = LANES):
        from preprocess.crop import CropConfig
        from preprocess.detector import build_detector
        from preprocess.subject import DEFAULT_PRIOR, Prior

        crop = model.crop
        known = set(CropConfig.__dataclass_fields__)
        self.config = CropConfig(**{k: v for k, v in (crop.get("config") or {}).items() if k in known}
                                 | {"device": "cpu", "strict": False})
        self.lanes = 1 if detector is not None else max(1, lanes)
        self._detectors = queue.SimpleQueue()
        for _ in range(self.lanes):
            self._detectors.put(detector or build_detector(crop.get("detector", {}), "cpu", self.config.batch_size))
        self.prior = Prior.from_dict(crop["prior"]) if crop.get("prior") else DEFAULT_PRIOR
        self.model = model
        self.names = list(model.cards[0].classes)  # the card's names: at the model's own `old`
        self.tasks = model.cards[0].tasks
        self.mask_unlearned = any("mask" in c.unlearned for c in model.cards)

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        from preprocess.faces import crop_lone_photos

        detector = self._detectors.get()
        try:
            cropped = crop_lone_photos(images, self.config.size, self.config.margin, detector, self.prior)
        finally:
            self._detectors.put(detector)
        ans = answer(self.model.run(np.stack([self.model.prepare(c) for c, _, _ in cropped])), self.model.temperatures)
        out = []
        for (_, choice, det), p, y in zip(cropped, ans.scores, ans.labels):
            cand = det["cands"][choice.index] if choice.index is not None else None
            out.append(self.describe(p, int(y), choice, cand))
        return out

    def describe(self, p: np.ndarray, y: int, choice, cand) -> dict:
        """One photo's answer: its class, and the task fields of that very class (`answer.task_values`)."""
        tasks = task_values(p, y, self.model.old, self.tasks)
        mask = L.decode(y)[0]
        warning = {1: "the mask is worn incorrectly", 2: "no mask"}.get(mask)
        if warning and self.mask_unlearned:  # a model that has not learned mask cannot raise this alarm
            warning = f"the model answers '{warning}', but it has not learned mask: this says nothing yet (see caution)"
        region = square_region(*square_around(choice.box, self.config.margin))  # the pixels crop_lone_photos cut
        return {"status": choice.status, "box": [round(float(v), 2) for v in choice.box], "crop": list(region),
                "score": None if cand is None else float(cand[4]), "class": y, "name": self.names[y],
                "probs": [float(v) for v in p], "tasks": tasks, **({"warning": warning} if warning else {})}


@dataclass
class _Job:
    images: list[np.ndarray]
    future: asyncio.Future = field(default=None)


class Batcher:
    """Collects the photos of concurrent requests for up to `wait_ms`, then runs them as one batch in a
    worker thread (the event loop keeps accepting requests meanwhile). Up to the engine's `lanes` batches
    run at once: one lane's detector works while the other's batch is cut and classified, so both cores
    stay busy (one lane left a 2-core machine a third idle at 16 clients, BENCHMARKS §29)."""

    def __init__(self, engine: Engine, wait_ms: float = WAIT_MS, max_batch: int = 64):
        self.engine, self.wait, self.max_batch = engine, wait_ms / 1000, max_batch
        self.lanes = getattr(engine, "lanes", 1)
        self.queue: asyncio.Queue | None = None
        self.task = None
        self.running: set[asyncio.Task] = set()

    async def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self):
        if self.task:
            self.task.cancel()
        for t in list(self.running):
            t.cancel()

    async def submit(self, images: list[np.ndarray]) -> list[dict]:
        job = _Job(images, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _loop(self):
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.lanes)
        while True:
            await free.acquire()  # a lane is free: the next batch is what has arrived by now (or within wait)
            try:
                jobs = [await self.queue.get()]
                deadline = loop.time() + self.wait
                while sum(len(j.images) for j in jobs) < self.max_batch:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        jobs.append(await asyncio.wait_for(self.queue.get(), left))
                    except asyncio.TimeoutError:
                        break
            except BaseException:
                free.release()
                raise
            task = asyncio.create_task(self._run(jobs, free))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, jobs: list[_Job], free: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            images = [im for j in jobs for im in j.images]
            try:
                results = await loop.run_in_executor(None, self.engine.predict, images)
            except Exception:  # noqa: BLE001 - one request's photo must not fail the others: each alone
                for j in jobs:
                    try:
                        result = await loop.run_in_executor(None, self.engine.predict, j.images)
                    except Exception as e:  # noqa: BLE001 - that request hears of it; the server goes on
                        if not j.future.done():
                            j.future.set_exception(e)
                    else:
                        if not j.future.done():
                            j.future.set_result(result)
                return
            k = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(results[k:k + len(j.images)])
                k += len(j.images)
        finally:
            free.release()


def parse_upload(content_type: str, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every `file` part of a multipart body, parsed in memory.

    The form a browser, curl or httpx sends (no preamble, CRLF lines, each part a `Content-Disposition:
    form-data; name="..."[; filename="..."]` and at most a `Content-Type`, names of MIME token characters)
    is cut with `bytes.find`; anything else goes to the standard library's email parser, as every body did
    before. Both give the same parts (tests/test_serve_budget.py compares them on generated bodies): the
    email parser took ~4 ms of the ~24 ms of server CPU a photo (BENCHMARKS §24), the cut ~0.02 ms (§25)."""
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(415, "send the photos as multipart/form-data, in the field 'file'")
    parts = _plain_form_parts(content_type, body)
    if parts is None:
        parts = _email_form_parts(content_type, body)
    files, others = [], []
    for name, filename, payload in parts:
        if name == "file":
            files.append((filename or f"photo{len(files) + 1}", payload))
        else:
            others.append(str(name))
    if not files:
        raise BadRequest(400, "no field 'file' in the form" + (f" (got {', '.join(others)})" if others else "")
                         + ": send each photo as file=@photo.jpg")
    if len(files) > max_files:
        raise BadRequest(400, f"{len(files)} photos: at most {max_files} a request (--max-files)")
    return files


def _email_form_parts(content_type: str, body: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(name, filename, payload) of each part, by the standard library's email parser (any valid body)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest(400, "the body is not a multipart form: send the photos in the field 'file'")
    return [(part.get_param("name", header="content-disposition"), part.get_filename(),
             part.get_payload(decode=True) or b"") for part in msg.iter_parts()]


# RFC 2046's boundary characters, less the space; unquoted, less the MIME specials too (a "(" there opens a comment)
_BOUNDARY = re.compile(r'multipart/form-data;[ ]?boundary='
                       r'(?:"([0-9A-Za-z\'()+_,./:=?-]{1,70})"|([0-9A-Za-z\'+_.-]{1,70}))')
_TOKEN = rb"[0-9A-Za-z!#$%&'*+.^_`{|}~-]+"  # MIME's token characters (no specials: the email parser reads those apart)
_WORDS = rb"((?:" + _TOKEN + rb"(?: " + _TOKEN + rb")*)?)"  # tokens, single spaces between
_DISPOSITION = re.compile(rb'Content-Disposition: form-data; name="' + _WORDS + rb'"(?:; filename="' + _WORDS + rb'")?')
_CONTENT_TYPE = re.compile(rb'Content-Type: [\x21-\x7e]+(?:; ?[\x21-\x7e]+)*')


def _plain_form_parts(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]] | None:
    """The parts of a body in the plain form (see `parse_upload`), or None for any other body: the email
    parser then reads it. Names and filenames of MIME token characters and single spaces read the same to
    both parsers (`photo (1).jpg` goes to the email parser); a part's payload ends where its CRLF and the
    next delimiter begin."""
    m = _BOUNDARY.fullmatch(content_type)
    if m is None:
        return None
    delim = b"--" + (m.group(1) or m.group(2)).encode("ascii")
    if not body.startswith(delim + b"\r\n"):
        return None
    parts, pos = [], len(delim) + 2
    while True:
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return None
        name = filename = None
        for line in body[pos:head_end].split(b"\r\n"):
            if (d := _DISPOSITION.fullmatch(line)) is not None and name is None:
                name, filename = (g if g is None else g.decode("ascii") for g in d.groups())
            elif _CONTENT_TYPE.fullmatch(line) is None:
                return None  # another header (a transfer encoding, a folded line, a second disposition)
        if name is None:
            return None
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            return None
        parts.append((name, filename, body[head_end + 4:nxt]))
        pos = nxt + 2 + len(delim)
        tail = body[pos:pos + 2]
        if tail == b"--":
            return parts if body[pos + 2:] in (b"", b"\r\n") else None
        if tail != b"\r\n":
            return None
        pos += 2  # a body that ends here has no header block left: the find above says None


def decode(filename: str, data: bytes) -> np.ndarray:
    if not data:
        raise BadRequest(400, f"{filename}: empty file")
    try:
        return load_rgb(io.BytesIO(data), size=len(data))
    except UnreadableImage as e:
        raise BadRequest(400, f"{filename}: {_why(e)}") from None


def _why(e: Exception) -> str:
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names the in-memory file


def pixels_of(files: list[tuple[str, bytes]], max_pixels: int) -> int:
    """The pixels the photos decode to, from their headers (nothing decoded): a 4xx for a request over
    `max_pixels` or a photo that is not one."""
    total = 0
    for name, data in files:
        if not data:
            raise BadRequest(400, f"{name}: empty file")
        try:
            w, h = photo_size(io.BytesIO(data))
        except UnreadableImage as e:
            raise BadRequest(400, f"{name}: {_why(e)}") from None
        total += w * h
    if total > max_pixels:
        raise BadRequest(413, f"the photos are {total / 1e6:.0f} MP decoded, over the {max_pixels / 1e6:.0f} MP a "
                              "request may hold (--max-pixels): send fewer or smaller photos")
    return total


def read_request(content_type: str, body: bytes, max_files: int, max_pixels: int, budget: "PixelBudget"):
    """Parse, check and decode one upload (in a worker thread: never on the event loop). Returns the files
    and their pixels; the request holds its pixels in `budget` until `budget.release`."""
    files = parse_upload(content_type, body, max_files)
    n = pixels_of(files, max_pixels)
    if not budget.take(n):
        raise BadRequest(503, "the server is busy decoding other photos; retry in a second")
    try:
        return files, [decode(name, data) for name, data in files], n
    except BaseException:
        budget.release(n)
        raise


class PixelBudget:
    """Decoded pixels (or buffered body bytes) held by requests at once, across threads: a burst of large
    photos gets 503s instead of swelling the server's memory. `used` is back at 0 once every request has
    ended, whether it was answered, refused, failed or cancelled by its client."""

    def __init__(self, limit: int):
        import threading

        self.limit, self.used, self.lock = limit, 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self.lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.lock:
            self.used -= n


def create_app(model: OnnxModel, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES, wait_ms: float = WAIT_MS,
               detector=None, max_pixels: int = MAX_PIXELS, server_pixels: int = SERVER_PIXELS):
    """The FastAPI application serving `model`."""
    import logging
    import time

    batcher = Batcher(Engine(model, detector), wait_ms)
    said = cautions(model.cards)  # a model that has not learned a task: every answer says so
    caution = {"caution": " ".join(said)} if said else {}
    budget = PixelBudget(max(server_pixels, max_pixels))
    body_budget = PixelBudget(SERVER_BYTES_REQUESTS * max_bytes)
    log = logging.getLogger("maskcls.serve")

    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="maskcls", lifespan=lifespan, docs_url=None, redoc_url=None,  # docs pages load a CDN
                  openapi_url="/openapi.json")
    app.state.pixels, app.state.body_bytes, app.state.batcher = budget, body_budget, batcher  # for tests and probes

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405: JSON like every other error
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": str(exc).splitlines()[0]}, status_code=422)

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "models": model.models, "img_size": model.img_size, **caution}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.replace("__MAX_FILES__", str(max_files))

    @app.post("/predict", openapi_extra=_upload_body(max_files),
              responses={200: {"model": Predictions}} | {k: {"model": Error, "description": v} for k, v in _ERRORS.items()})
    async def predict(request: Request):
        t0, photos, status, body_held = time.perf_counter(), 0, 200, [0]
        try:
            try:
                body = await _read_body(request, max_bytes, body_budget, body_held)
                files, images, held = await _decoded(request.headers.get("content-type", ""), body, max_files,
                                                     max_pixels, budget)
            finally:
                body_budget.release(body_held[0])  # the body is parsed (or refused): its bytes are not held
                body = None
            photos = len(files)
            try:
                results = await batcher.submit(images)
            finally:
                del images
                budget.release(held)
            return {"predictions": [{"filename": name} | r for (name, _), r in zip(files, results)], **caution}
        except BadRequest as e:
            status = e.status
            return JSONResponse({"error": str(e)}, status_code=e.status,
                                headers={"Retry-After": "1"} if e.status == 503 else None)
        except Exception as e:  # noqa: BLE001 - a bug of ours: a JSON 500 for this request, the server goes on
            status = 500
            log.exception("POST /predict failed")
            return JSONResponse({"error": f"the server could not predict these photos ({type(e).__name__})"},
                                status_code=500)
        finally:
            log.info("POST /predict %d %d photo(s) %.0f ms", status, photos, (time.perf_counter() - t0) * 1000)

    return app


async def _decoded(content_type: str, body: bytes, max_files: int, max_pixels: int, budget: PixelBudget):
    """read_request in a worker thread. A client that goes away while its photos decode cancels this
    coroutine, not the thread: the thread's pixels are then given back when it ends, so the budget
    cannot leak (it did: 503s for good)."""
    fut = asyncio.get_running_loop().run_in_executor(None, read_request, content_type, body, max_files, max_pixels,
                                                     budget)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_give_back(budget))
        raise


def _give_back(budget: PixelBudget):
    def done(f) -> None:
        if not f.cancelled() and f.exception() is None:
            budget.release(f.result()[2])
    return done


async def _read_body(request, max_bytes: int, budget: PixelBudget | None = None, held: list | None = None) -> bytes:
    """The body, at most `max_bytes`; its bytes are taken from `budget` as they arrive (`held[0]` says how
    many, for the caller to release), so a burst of bodies gets 503s before it is buffered."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"the request is {int(declared)} bytes, over the {max_bytes}-byte limit (--max-bytes)")
    held = held if held is not None else [0]
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise BadRequest(413, f"the request is over the {max_bytes}-byte limit (--max-bytes)")
        if budget is not None:
            if not budget.take(len(chunk)):
                raise BadRequest(503, "the server is busy receiving other uploads; retry in a second")
            held[0] += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


def serve(model_path: Path, host: str = "127.0.0.1", port: int = 8000, max_bytes: int = MAX_BYTES,
          max_files: int = MAX_FILES, wait_ms: float = WAIT_MS, on_ready=None, max_pixels: int = MAX_PIXELS) -> None:
    import logging

    import uvicorn

    model = OnnxModel(model_path)
    app = create_app(model, max_bytes, max_files, wait_ms, max_pixels=max_pixels,
                     server_pixels=max(SERVER_PIXELS, 3 * max_pixels))
    handler = logging.StreamHandler()  # one line per request: time, status, photos, ms
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    request_log = logging.getLogger("maskcls.serve")
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    for c in cautions(model.cards):  # on the terminal too, as predict prints it
        request_log.warning("warning: %s", c)
    if on_ready:
        on_ready()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


PAGE = (Path(__file__).parent / "serve_page.html").read_text(encoding="utf-8")
