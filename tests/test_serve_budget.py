"""serve under load (issue 34, item 11): a failed micro-batch is retried job by job, so one bad photo fails only
its own request; 503s come from the budgets and go away again (the pixel and body budgets are back at 0 after a
burst, and after a client that left while its photos were decoding). A fake engine stands in for the model."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from classify.deploy import serve  # noqa: E402

POISON = 13  # a photo whose every pixel is 13 makes the fake engine raise, as a photo failing inside the engine


class FakeEngine:
    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = [], delay

    def predict(self, images):
        self.calls.append(len(images))
        time.sleep(self.delay)
        if any((im == POISON).all() for im in images):
            raise ValueError("this photo broke the engine")
        return [{"status": "ok", "class": int(im.shape[0]), "mean": float(im.mean())} for im in images]


def test_a_failed_batch_is_retried_job_by_job_so_only_the_bad_request_fails():
    engine = FakeEngine()
    good, bad = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), POISON, np.uint8)

    async def main():
        batcher = serve.Batcher(engine, wait_ms=200)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.submit([good, good]), batcher.submit([bad]),
                                        batcher.submit([good]), return_exceptions=True)
        finally:
            await batcher.stop()

    first, second, third = asyncio.run(main())
    assert engine.calls[0] == 4  # one micro-batch of the three requests ...
    assert [r["mean"] for r in first] == [200.0, 200.0] and [r["mean"] for r in third] == [200.0]
    assert isinstance(second, ValueError)  # ... and only the request with the bad photo hears of it
    assert sorted(engine.calls[1:]) == [1, 1, 2]


class Overlap(FakeEngine):
    """A fake engine with `lanes`, counting how many of its batches run at the same moment."""

    def __init__(self, lanes: int):
        super().__init__(delay=0.15)
        self.lanes, self.now, self.most, self.lock = lanes, 0, 0, threading.Lock()

    def predict(self, images):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().predict(images)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("lanes", [1, 2])
def test_an_engine_with_two_lanes_runs_two_micro_batches_at_once_and_each_request_gets_its_own(lanes):
    """serve's engine has two lanes (a detector each): while one micro-batch runs, the photos that arrive
    meanwhile go through the other lane at once, not after it (BENCHMARKS §29). One lane never overlaps."""
    engine = Overlap(lanes)
    photos = [np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30, 40)]

    async def main():
        batcher = serve.Batcher(engine, wait_ms=1)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(photos[:1]))
            await asyncio.sleep(0.05)  # the first micro-batch is running now
            return await asyncio.gather(first, *(batcher.submit([im]) for im in photos[1:]))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert engine.most == lanes
    assert [r[0]["mean"] for r in results] == [10.0, 20.0, 30.0, 40.0]  # answers go back to their own requests
    assert sum(engine.calls) == 4


def _png(side: int, value: int = 120) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((side, side, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _app(monkeypatch, delay: float, **limits):
    monkeypatch.setattr(serve, "Engine", lambda model, detector=None: FakeEngine(delay))
    model = SimpleNamespace(models=["fake"], img_size=32, cards=[])  # cards: no caution to carry
    return serve.create_app(model, wait_ms=5, **limits)


def test_a_burst_over_the_pixel_budget_gets_503s_and_the_budget_returns_to_zero(monkeypatch):
    from starlette.testclient import TestClient

    side = 64
    app = _app(monkeypatch, delay=0.2, max_pixels=side * side, server_pixels=2 * side * side)
    statuses, lock = [], threading.Lock()
    with TestClient(app) as client:
        def one():
            r = client.post("/predict", files=[("file", ("a.png", _png(side), "image/png"))])
            with lock:
                statuses.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {s for s, _ in statuses} == {200, 503}, statuses  # some served, some told to come back
        assert all(ra == "1" for s, ra in statuses if s == 503)
        assert app.state.pixels.used == 0 and app.state.body_bytes.used == 0
        r = client.post("/predict", files=[("file", ("a.png", _png(side), "image/png"))])
        assert r.status_code == 200  # the 503s were not for good
        # a refused upload (not an image) gives its body bytes back too
        assert client.post("/predict", files=[("file", ("a.png", b"not an image", "image/png"))]).status_code == 400
        assert app.state.pixels.used == 0 and app.state.body_bytes.used == 0


def test_bodies_beyond_the_body_budget_get_503_before_they_are_buffered(monkeypatch):
    budget = serve.PixelBudget(100)
    budget.take(90)  # other uploads hold most of it

    class Request:
        headers = {"content-length": "50"}

        async def stream(self):
            for _ in range(5):
                yield b"x" * 10

    held = [0]
    with pytest.raises(serve.BadRequest) as e:
        asyncio.run(serve._read_body(Request(), 1000, budget, held))
    assert e.value.status == 503 and held[0] == 10  # the caller releases what was taken
    budget.release(held[0])
    assert budget.used == 90


def test_a_client_gone_while_its_photos_decode_gives_its_pixels_back(monkeypatch):
    budget = serve.PixelBudget(10_000)
    started = threading.Event()

    def slow_read(content_type, body, max_files, max_pixels, budget_):
        budget_.take(4096)
        started.set()
        time.sleep(0.3)  # decoding, while the client goes away
        return [("a.png", body)], [np.zeros((64, 64, 3), np.uint8)], 4096

    monkeypatch.setattr(serve, "read_request", slow_read)

    async def main():
        task = asyncio.create_task(serve._decoded("multipart/form-data", b"x", 4, 10_000, budget))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.used == 4096  # the thread still holds it while it decodes ...
        await asyncio.sleep(0.6)

    asyncio.run(main())
    assert budget.used == 0  # ... and gives it back when it ends


# -- the upload's parser -----------------------------------------------------------------------------

_NAME = "abcXYZ019 _-.!#$%&'()*+,/:;<=>?@[]^`{|}~\"\\é"


def _form(parts, boundary: str, crlf: bytes = b"\r\n") -> bytes:
    out = b""
    for name, filename, ctype, payload in parts:
        disp = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = [disp.encode("utf-8")] + ([f"Content-Type: {ctype}".encode()] if ctype else [])
        out += b"--" + boundary.encode() + crlf + crlf.join(head) + crlf + crlf + payload + crlf
    return out + b"--" + boundary.encode() + b"--" + crlf


ODD = [  # what a hand-made or hostile client may change in a body
    lambda body, b: body,
    lambda body, b: body.replace(b"Content-Disposition", b"content-disposition"),
    lambda body, b: body.replace(b"form-data; name", b"form-data;  name"),
    lambda body, b: body.replace(b"; filename", b";\r\n filename"),  # a folded header
    lambda body, b: body.replace(b"\r\n\r\n", b"\r\nX-Extra: 1\r\n\r\n", 1),
    lambda body, b: body.replace(b"\r\n\r\n", b"\r\n\r\nhead--" + b + b"X\r\n--" + b + b"Y", 1),  # near-delimiters
    lambda body, b: body.replace(b"--" + b + b"\r\n", b"--" + b + b"  \r\n"),  # transport padding
    lambda body, b: body[:-4],  # cut short
    lambda body, b: body + b"epilogue",
]


def test_the_plain_form_cut_reads_every_body_as_the_email_parser_does():
    """parse_upload cuts the plain form itself (a browser's, curl's, httpx's) and hands anything else to the
    email parser: on generated bodies, whatever the cut accepts must give the email parser's parts, names,
    filenames and bytes exactly (payloads full of CR, LF and dashes; names with quotes, backslashes and
    non-ASCII, which go to the email parser), and the plain form must take the fast cut."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(alphabet="abcXYZ019_-.", max_size=8) | st.text(alphabet=_NAME, max_size=8)
    payload = st.binary(max_size=64) | st.lists(st.sampled_from([b"\r\n", b"--", b"\r", b"\n", b"x", b"-"]),
                                               max_size=12).map(b"".join)
    part = st.tuples(st.sampled_from(["file", "other"]) | text, st.none() | text,
                     st.sampled_from([None, "image/jpeg", "application/octet-stream", "text/plain; charset=utf-8"]),
                     payload)
    taken = {"fast": 0, "email": 0}

    # derandomize: the same 600 bodies every run. Drawn afresh, about one run in ten took the fast cut only
    # 99 times and failed the count below (seen in stop 46), a flake CI must not have.
    @settings(max_examples=600, deadline=None, database=None, derandomize=True)
    @given(parts=st.lists(part, min_size=1, max_size=4), boundary=st.sampled_from(["b0und", "----WebKitFormBoundaryAbC9", "a'b(c)"]),
           quoted=st.booleans(), crlf=st.sampled_from([b"\r\n"] * 3 + [b"\n"]), preamble=st.sampled_from([b""] * 3 + [b"junk\r\n"]),
           odd=st.just(ODD[0]) | st.sampled_from(ODD))
    def check(parts, boundary, quoted, crlf, preamble, odd):
        ctype = f'multipart/form-data; boundary={boundary if not quoted else chr(34) + boundary + chr(34)}'
        body = odd(preamble + _form(parts, boundary, crlf), boundary.encode())
        fast = serve._plain_form_parts(ctype, body)
        if fast is None:
            taken["email"] += 1
            return
        taken["fast"] += 1
        assert fast == serve._email_form_parts(ctype, body)
        if odd is ODD[0]:
            assert [p[2] for p in fast] == [p[3] for p in parts]  # the bytes sent, to the byte

    check()
    assert taken["fast"] > 100 and taken["email"] > 100, taken


def test_uploads_from_httpx_take_the_plain_cut_and_odd_ones_still_parse():
    import httpx

    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes() + b"\r\n--tail"
    req = httpx.Request("POST", "http://x/predict", files=[("file", ("a b.jpg", jpeg, "image/jpeg")),
                                                           ("file", ("", b"\r\n", "image/png")), ("note", (None, b"hi"))])
    body, ctype = req.read(), req.headers["content-type"]
    assert serve._plain_form_parts(ctype, body) is not None  # the fast cut
    assert serve.parse_upload(ctype, body, 4) == [("a b.jpg", jpeg), ("photo2", b"\r\n")]
    # a part with a transfer encoding: not the plain form; the email parser decodes it
    b64 = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--zz--\r\n")
    assert serve._plain_form_parts("multipart/form-data; boundary=zz", b64) is None
    assert serve.parse_upload("multipart/form-data; boundary=zz", b64, 4) == [("q.jpg", b"hello")]
    with pytest.raises(serve.BadRequest, match="no field .file. in the form .got filX, filX, note."):
        serve.parse_upload(ctype, body.replace(b'name="file"', b'name="filX"'), 4)
