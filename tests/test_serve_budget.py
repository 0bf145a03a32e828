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


def _png(side: int, value: int = 120) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((side, side, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _app(monkeypatch, delay: float, **limits):
    monkeypatch.setattr(serve, "Engine", lambda model, detector=None: FakeEngine(delay))
    model = SimpleNamespace(models=["fake"], img_size=32)
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
