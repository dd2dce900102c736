"""Requests that arrive together become one call of the served pyfunc.

The pyfunc already runs one forward pass for the images of the calls that wait for its model
thread (pipeline/model/micro_batcher.py), but each request still paid the pyfunc's own work alone:
MLflow's schema enforcement, a DataFrame in and one out, the drift statistics, the metrics. With
single-image requests that work cost more CPU than the network itself on 2 cores (measured:
benchmarks/RESULTS.md, Serving near the limit). Here the event loop gathers the requests that wait
while a call runs, and the next call scores all of them (`on_error="report"`, so one bad image
fails only its own request) and hands each request its rows: the same pyfunc, the same answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import pandas as pd

from pipeline.model.classifier import IMAGE_COLUMN, MAX_IMAGES_PER_REQUEST

# The request id of each row of the call being scored, for what observes the model's answers.
ROW_REQUEST_IDS: ContextVar[tuple[str, ...]] = ContextVar("row_request_ids", default=())


class ImageError(Exception):
    """A request's image could not be scored: the message its own call would have raised."""


@dataclass
class Waiting:
    images: list[Any]
    request_id: str
    answer: asyncio.Future


class RequestBatcher:
    """One pyfunc call at a time; the requests that arrive meanwhile with the same params wait and
    go together in the next one (at most the pyfunc's per-call limit of images)."""

    def __init__(
        self,
        predict: Callable[[pd.DataFrame, dict[str, Any]], list[dict[str, Any]]],
        wait_s: float = 0.002,
    ) -> None:
        self.predict, self.wait_s = predict, wait_s
        self.waiting: dict[str, tuple[dict[str, Any], list[Waiting]]] = {}
        self.draining: asyncio.Task | None = None

    async def score(
        self, images: list[Any], params: dict[str, Any], request_id: str
    ) -> list[dict[str, Any]]:
        """This request's rows of the answer (one dict per image), as its own call would give
        them; an image that cannot be scored raises ImageError with that call's message."""
        key = json.dumps(params, sort_keys=True, default=str)
        answer = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, (params, []))[1].append(Waiting(images, request_id, answer))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self.drain())
        return await answer

    async def drain(self) -> None:
        while self.waiting:
            await self.let_arrive()
            key = next(iter(self.waiting))
            params, queued = self.waiting[key]
            group, count = [], 0
            while queued and (not group or count + len(queued[0].images) <= MAX_IMAGES_PER_REQUEST):
                count += len(queued[0].images)
                group.append(queued.pop(0))
            if not queued:
                del self.waiting[key]
            await self.run_together(group, params)

    async def let_arrive(self, turns_without_news: int = 2) -> None:
        """Let requests whose bytes are already here reach the queue before a call starts: yield
        to the event loop until `turns_without_news` turns in a row bring none (at most
        `wait_s`). A lone request waits a few microseconds; under load the call takes everyone
        who came while the last one ran, instead of starting with the first to arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        count, quiet = self.waiting_count(), 0
        while quiet < turns_without_news and loop.time() < deadline:
            await asyncio.sleep(0)
            now = self.waiting_count()
            quiet = quiet + 1 if now == count else 0
            count = now

    def waiting_count(self) -> int:
        return sum(len(queued) for _, queued in self.waiting.values())

    async def run_together(self, group: list[Waiting], params: dict[str, Any]) -> None:
        images = [image for request in group for image in request.images]
        ids = tuple(request.request_id for request in group for _ in request.images)
        frame = pd.DataFrame({IMAGE_COLUMN: pd.Series(images, dtype=object)})
        token = ROW_REQUEST_IDS.set(ids)
        try:
            result = await anyio.to_thread.run_sync(
                self.predict, frame, params | {"on_error": "report"}
            )
        except Exception as error:  # every request of the call gets the error
            for request in group:
                if not request.answer.done():
                    request.answer.set_exception(error)
            return
        finally:
            ROW_REQUEST_IDS.reset(token)
        start = 0
        for request in group:
            rows = result[start : start + len(request.images)]
            start += len(request.images)
            if request.answer.done():  # its client gave up (a timeout)
                continue
            try:
                request.answer.set_result(own_answer(rows))
            except ImageError as error:
                request.answer.set_exception(error)


def own_answer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as a call with `on_error="raise"` answers them; raises that call's error for the
    first bad image (numbered within the request, as that call numbers it)."""
    for index, row in enumerate(rows):
        if row["error"]:
            raise ImageError(f"image {index}: {row['error']}")
    return [{name: value for name, value in row.items() if name != "error"} for row in rows]
