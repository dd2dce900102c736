"""The logged classifier: loading it has no process-wide side effects, and releasing it ends its
thread (a notebook or batch job that loads model after model must not pile up threads)."""

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.config import resolve_train_config
from pipeline.train import run_train

LOAD_AND_RELEASE = textwrap.dedent(
    """
    import gc, json, sys, threading
    import mlflow, numpy as np, pandas as pd
    from pipeline.model.imaging import encode_png

    calls = []
    sys.addaudithook(
        lambda event, args: calls.append(str(args[1]))
        if event == "ctypes.dlsym" and "mallopt" in str(args[1]) else None
    )
    frame = pd.DataFrame({"image": [encode_png(np.zeros((32, 32, 3), np.uint8))]})

    def load_predict_release():
        model = mlflow.pyfunc.load_model(sys.argv[1])
        model.predict(frame)
        del model
        gc.collect()

    load_predict_release()  # MLflow's own first-use threads start here
    baseline = threading.active_count()
    for _ in range(20):
        load_predict_release()
    closed = mlflow.pyfunc.load_model(sys.argv[1])
    closed.unwrap_python_model().close()
    gc.collect()
    print(json.dumps({"baseline": baseline, "after": threading.active_count(),
                      "mallopt": calls, "torch_threads": [t.name for t in threading.enumerate()
                                                          if t.name == "torch"]}))
    """
)


@pytest.fixture
def tiny_model_uri(tracking) -> str:
    config = resolve_train_config(
        {
            "model": "cnn",
            "data_dir": "synthetic",
            "epochs": 1,
            "width": 8,
            "max_train_images": 64,
            "batch_size": 32,
            "experiment_name": tracking,
        }
    )
    return run_train(config).model_uri


def test_twenty_loads_and_releases_leave_no_thread_and_never_touch_malloc(tiny_model_uri):
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RELEASE, tiny_model_uri],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # MLflow keeps the last model-from-code object it built (mlflow.models.model.__mlflow_model__)
    # until the next load, so the one thread of the last model may still run: never more.
    assert result["after"] <= result["baseline"]
    assert len(result["torch_threads"]) <= 1
    assert result["mallopt"] == []
