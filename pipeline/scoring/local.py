"""The chunk both engines score, and the local engine: one process, chunk after chunk.

Both engines call the logged pyfunc's own `predict` (the decoding and forward pass that serving and
`evaluate` use) with `on_error="report"`, so a file that is not a readable image gets a row with its
error instead of stopping the job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
from tqdm import tqdm

from pipeline.config import PredictConfig
from pipeline.data.inputs import InputFiles, read_bytes
from pipeline.model.classifier import IMAGE_COLUMN

SCORE_OPTIONS = {"on_error": "report"}


def score_chunk(
    model: mlflow.pyfunc.PyFuncModel, paths: list[Path], tta: bool, explain: bool = False
) -> pd.DataFrame:
    """The pyfunc's answer for a chunk of files, one row each; unreadable files keep their error."""
    contents = [read_bytes(path) for path in paths]
    frame = pd.DataFrame({IMAGE_COLUMN: [c if isinstance(c, bytes) else b"" for c in contents]})
    params = {"tta": tta, **SCORE_OPTIONS} | ({"explain": True} if explain else {})
    scored = model.predict(frame, params=params)
    unread = [c if isinstance(c, str) else "" for c in contents]
    scored["error"] = [u or e for u, e in zip(unread, scored["error"], strict=True)]
    return scored


class ScoringProgress:
    """A bar on a terminal; in a log file, a line at every tenth of the files."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.next_line = total, 0, total / 10
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())

    def update(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        if self.bar.disable and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            print(
                f"scored {self.done:,} of {self.total:,} files ({rate:,.0f} images/s)",
                file=sys.stderr,
                flush=True,
            )
            self.next_line = self.done + self.total / 10

    def close(self) -> None:
        self.bar.close()


def score_local(
    model: mlflow.pyfunc.PyFuncModel, inputs: InputFiles, config: PredictConfig
) -> pd.DataFrame:
    progress = ScoringProgress(len(inputs.files))
    frames = []
    try:
        for start in range(0, len(inputs.files), config.batch_size):
            chunk = inputs.files[start : start + config.batch_size]
            frames.append(score_chunk(model, chunk, config.tta, config.explain))
            progress.update(len(chunk))
    finally:
        progress.close()
    scored = pd.concat(frames, ignore_index=True)
    scored.insert(0, "path", [inputs.relative(p) for p in inputs.files])
    return scored
