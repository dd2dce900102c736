"""`train` under torch.distributed on this machine's CPUs: two gloo processes train like one process
with the same global batch, log one run, stop together when one is killed and resume to the end
of an unbroken job; two launchers on loopback form one job (a c10d rendezvous)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from pipeline.config import ConfigError, resolve_train_config
from pipeline.tracking.launch import JOB_TAG
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
# No batch norm and no dropout: per-process batch statistics and dropout masks are the only things
# that may differ from one process (SyncBatchNorm needs CUDA). fp32: the same sums on any CPU.
TINY = ["--model", "cnn", "--data-dir", "synthetic", "--width", "8", "--batch-norm", "false",
        "--dropout", "0", "--max-train-images", "256", "--batch-size", "32", "--precision", "fp32",
        "--checkpoint-seconds", "0", "--experiment-name", "ddp"]  # fmt: skip


def train(tmp_path: Path, *args: str, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", *TINY, *args],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture
def store(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """A store with one 4-epoch run on one process, then the same on two processes."""
    root = tmp_path_factory.mktemp("unbroken")
    train(root, "--epochs", "4")
    _, err = train(root, "--epochs", "4", "--nproc-per-node", "2")
    assert "2 processes (1 machine(s) x 2)" in err
    return root


def runs_of(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["ddp"], order_by=["attributes.start_time ASC"],
                              output_format="list")  # fmt: skip


def weights(model_uri: str) -> dict[str, torch.Tensor]:
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model.state_dict()


def losses(client, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"),
                                    key=lambda m: m.step)]  # fmt: skip


def test_two_processes_train_like_one_and_log_one_run(unbroken):
    runs = runs_of(unbroken)
    store = mlflow.MlflowClient()
    assert len(runs) == 2  # one run per job, whatever its number of processes
    alone, together = runs
    assert together.data.tags["distributed.world_size"] == "2" and JOB_TAG in together.data.tags
    assert len(store.get_metric_history(together.info.run_id, "val_accuracy")) == 4
    logged = set(together.data.metrics)  # rank 1 adds only its system metrics, by node
    assert {m.split("/")[1] for m in logged if m.startswith("system/")} <= {"rank0", "rank1"}
    assert losses(store, together.info.run_id) == pytest.approx(
        losses(store, alone.info.run_id), rel=1e-4
    )
    one, two = weights(alone.data.tags["model_uri"]), weights(together.data.tags["model_uri"])
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-2, atol=1e-3)


def ranks_of(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "pipeline.train" in " ".join(child.cmdline()):
                found[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            continue
    return found


@pytest.mark.parametrize("resumed_on", [2, 1])
@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_ends_like_an_unbroken_job(
    tmp_path, unbroken, store, resumed_on
):
    launcher = train(tmp_path, "--epochs", "4", "--nproc-per-node", "2", wait=False)
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline:  # until rank 0 has checkpointed epoch 1
        experiment = store.get_experiment_by_name("ddp")
        runs = store.search_runs([experiment.experiment_id]) if experiment else []
        if runs and store.get_metric_history(runs[0].info.run_id, "val_accuracy"):
            run = runs[0]
            break
        time.sleep(0.2)
    assert run is not None, launcher.communicate(timeout=60)[1][-2000:]
    killed_at = time.monotonic()
    ranks_of(launcher)[1].send_signal(signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2 and time.monotonic() - killed_at < 60
    assert "rank 1 was killed by SIGKILL" in err and "--resume-run-id" in err
    failed = store.get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and "rank 1" in failed.data.tags["error"]
    train(tmp_path, "--resume-run-id", run.info.run_id, "--nproc-per-node", str(resumed_on))
    resumed = store.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["epochs_run"] == 4
    got = weights(resumed.data.tags["model_uri"])
    expected = weights(runs_of(unbroken)[1].data.tags["model_uri"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # The same processes from the same checkpoint: the same numbers, to the last bit; one
    # process instead of two: the same sums in another order.
    exact = resumed_on == 2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0 if exact else 1e-2,
                                   atol=0 if exact else 1e-3)  # fmt: skip


def test_two_launchers_on_loopback_make_one_job(tmp_path, store):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        train(tmp_path, "--epochs", "1", "--nnodes", "2", "--node-rank", str(rank),
              "--rdzv-endpoint", endpoint, wait=False)
        for rank in (0, 1)
    ]  # fmt: skip
    results = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert sum(out.count("train finished") for out, _ in results) == 1
    runs = store.search_runs([store.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["distributed.world_size"] == "2"


def test_a_time_budget_is_one_plan_for_every_process(tmp_path, store):
    """Each process probes its own share, and every one follows rank 0's plan and its pacer's
    re-plans: with many short epochs two clocks rarely agree to the step, and a process that
    planned more would wait for the others' collectives until the timeout."""
    _, err = train(tmp_path, "--time-budget", "15s", "--nproc-per-node", "2")
    run = store.search_runs([store.get_experiment_by_name("ddp").experiment_id])[0]
    assert run.data.metrics["epochs_run"] > 1, err[-2000:]
    assert run.data.metrics["train_seconds"] <= 15 * 1.1
    history = store.get_metric_history(run.info.run_id, "learning_rate")
    last = max(history, key=lambda m: m.step).value
    assert last < 1e-3 * float(run.data.params["lr"])  # both processes ended the same schedule


def test_a_batch_that_does_not_split_evenly_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="does not divide among 3 processes.*multiple of 3"):
        resolve_train_config({"model": "cnn", "batch_size": 32, "nproc_per_node": 3})


def test_a_taken_rendezvous_port_is_refused_before_any_process_starts():
    import socket

    from pipeline.tracking.launch import DistributedTrainingError, check_rendezvous_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        recipe = resolve_train_config({"model": "cnn", "nproc_per_node": 2,
                                       "rdzv_endpoint": f"127.0.0.1:{port}"})  # fmt: skip
        with pytest.raises(DistributedTrainingError, match=f"port {port} .* is taken here"):
            check_rendezvous_port(recipe)
