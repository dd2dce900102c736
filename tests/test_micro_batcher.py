"""The micro-batcher: waiting requests share one forward pass on one thread, and it stops."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.model.micro_batcher import MicroBatcher


class RecordingForward:
    """A forward pass that takes 20 ms and answers each image with its own value: batch sizes are
    recorded, and every caller can check it got its own rows back."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, model, images: np.ndarray, tta: bool) -> np.ndarray:
        self.batches.append(len(images))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.02)
        if (images == 255).any():
            raise ValueError("poisoned batch")
        return images.reshape(len(images), -1)[:, :1].astype(np.float64) + (100 if tta else 0)


def ask(batcher: MicroBatcher, value: int, count: int = 1, tta: bool = False) -> np.ndarray:
    with batcher.caller():
        return batcher.predict(np.full((count, 2, 2, 3), value, np.uint8), tta)


def test_waiting_requests_run_as_one_batch_and_each_gets_its_own_rows():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=64, wait_s=0.005)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda v: ask(batcher, v, count=1 + v % 3), range(16)))
    for value, answer in enumerate(answers):
        assert answer.shape == (1 + value % 3, 1) and (answer == value).all()
    assert max(forward.batches) > 1 and len(forward.batches) < 16
    assert sum(forward.batches) == sum(1 + v % 3 for v in range(16))
    assert forward.threads == {"torch"}


def test_a_lone_request_does_not_wait_and_the_cap_bounds_a_batch():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=4, wait_s=1.0)
    started = time.perf_counter()
    assert ask(batcher, 7)[0, 0] == 7
    assert time.perf_counter() - started < 0.5  # the 1 s wait is only for callers already decoding
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda v: ask(batcher, v, count=2), range(12)))
    assert max(forward.batches) <= 4


def test_tta_requests_are_batched_apart_and_an_error_reaches_its_caller_only():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: None, forward, max_images=64, wait_s=0.005)
    with ThreadPoolExecutor(8) as pool:
        plain = pool.submit(ask, batcher, 3)
        mirrored = pool.submit(ask, batcher, 3, 1, True)
        assert plain.result()[0, 0] == 3 and mirrored.result()[0, 0] == 103
    with pytest.raises(ValueError, match="poisoned"):
        ask(batcher, 255)
    assert ask(batcher, 5)[0, 0] == 5


def test_stop_ends_the_thread_after_the_queued_requests_and_later_calls_are_refused():
    batcher = MicroBatcher(lambda: None, RecordingForward(), max_images=64, wait_s=0.0)
    assert ask(batcher, 4)[0, 0] == 4
    batcher.stop()
    batcher.thread.join(timeout=5)
    assert not batcher.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        ask(batcher, 4)


def test_a_model_job_runs_on_the_model_thread_between_batches_never_inside_one():
    forward = RecordingForward()
    batcher = MicroBatcher(lambda: "the model", forward, max_images=64, wait_s=0.005)
    seen = []

    def job(model):
        seen.append((model, threading.current_thread().name, len(forward.batches)))
        return "explained"

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(ask, batcher, v) for v in range(6)]
        jobs = [pool.submit(batcher.call, job) for _ in range(2)]
        assert [j.result() for j in jobs] == ["explained", "explained"]
        assert [p.result()[0, 0] for p in plain] == list(range(6))
    assert [(model, thread) for model, thread, _ in seen] == [("the model", "torch")] * 2
    assert sum(forward.batches) == 6  # the jobs added no image to any batch
    with pytest.raises(ZeroDivisionError):
        batcher.call(lambda model: 1 / 0)
    assert ask(batcher, 7)[0, 0] == 7  # a failed job leaves the thread serving
