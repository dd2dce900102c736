"""`train` on several processes: the same stage under torch.distributed's elastic launcher
(torchrun's Python API), and the one MLflow run it makes.

Each process (`python -m pipeline.train`) gets the recipe in an environment variable and trains its
shard; rank 0 opens, logs and finishes the run exactly as one process would, and tags it with the
job's id; the other ranks log nothing. When a process dies, the launcher stops the others (no
restarts: a resumed run is a decision), ends the job's run FAILED naming the rank, and says how to
resume. Several machines run the same command with their `node_rank`; machine 0 hosts the c10d
rendezvous at `rdzv_endpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
import uuid

import mlflow
import psutil
from mlflow.entities import RunStatus

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError

RECIPE_ENV = "CIFAR10_TRAIN_RECIPE"
JOB_ENV = "CIFAR10_TRAIN_JOB"
JOB_TAG = "distributed.job"


class DistributedTrainingError(PipelineError):
    """A process of the job failed; the message names it and how to resume."""


def job_id(recipe: TrainConfig) -> str:
    """The rendezvous id: the same on every machine of one job (they share the endpoint), fresh
    for each job on one machine."""
    if recipe.nnodes > 1:
        return f"cifar10-{recipe.rdzv_endpoint.replace(':', '-')}"
    return f"cifar10-{uuid.uuid4().hex[:12]}"


def job_run(job: str, experiment_ids: list[str] | None = None) -> mlflow.entities.Run | None:
    """The run rank 0 opened for this job (or None if it died before)."""
    client = mlflow.MlflowClient()
    if run_id := os.environ.get("MLFLOW_RUN_ID"):
        return client.get_run(run_id)
    ids = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=1)
    return found[0] if found else None


def failure_reason(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        return f"rank {rank} was killed by {signal.Signals(-exitcode).name}"
    return f"rank {rank} exited with code {exitcode}"


def check_rendezvous_port(recipe: TrainConfig) -> None:
    """On machine 0, which hosts the rendezvous: its port must be free, said before any process
    starts rather than as a worker's traceback."""
    if recipe.node_rank != 0:
        return
    port = int(recipe.rdzv_endpoint.rsplit(":", 1)[-1])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise DistributedTrainingError(
                f"the rendezvous port {port} ({recipe.rdzv_endpoint}) is taken here "
                f"({error.strerror}); pass another, e.g. -P rdzv_endpoint="
                f"{recipe.rdzv_endpoint.rsplit(':', 1)[0]}:{port + 1} (the same on every machine)."
            ) from None


def job_failed(
    recipe: TrainConfig, job: str, reason: str, started: float
) -> DistributedTrainingError:
    """A dead process stopped the job: its run ended FAILED with the reason, and the error that
    says how to resume it."""
    run = job_run(job)
    if run is not None and run.info.status != "FINISHED":
        client = mlflow.MlflowClient()
        seen = run.data.tags.get("error", "")  # rank 0's own view, e.g. gloo's lost peer
        client.set_tag(run.info.run_id, "error", f"{reason}; every process was stopped"
                       + (f" (rank 0 saw: {seen[:300]})" if seen else ""))  # fmt: skip
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    resume = (
        f" Resume with: cifar10 train --resume-run-id {run.info.run_id} --nproc-per-node "
        f"{recipe.nproc_per_node} (or another number of processes)."
        if run is not None
        else " It failed before rank 0 opened its run; run the same command again."
    )
    return DistributedTrainingError(
        f"distributed training stopped: {reason} after {time.time() - started:.0f} s; the "
        f"other processes were stopped.{resume}"
    )


def launch_training(recipe: TrainConfig):
    """Run `recipe` on nproc_per_node processes here (times nnodes machines); the TrainResult of
    the job's run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipeline.tracking.training_run import TrainResult

    check_rendezvous_port(recipe)
    job = job_id(recipe)
    os.environ[RECIPE_ENV] = json.dumps(dataclasses.asdict(recipe))
    os.environ[JOB_ENV] = job
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    if recipe.resume_run_id:  # `mlflow run`'s new run was discarded: rank 0 reopens the old one
        os.environ.pop("MLFLOW_RUN_ID", None)
    # torchrun's own default for several processes; here the machine's cores are shared out.
    threads = max(1, (psutil.cpu_count(logical=False) or 1) // recipe.nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    print(
        f"train: {recipe.world_size} processes ({recipe.nnodes} machine(s) x "
        f"{recipe.nproc_per_node}), job {job}, rendezvous {recipe.rdzv_endpoint}; rank 0 logs "
        "the run",
        file=sys.stderr,
        flush=True,
    )
    config = LaunchConfig(
        min_nodes=recipe.nnodes,
        max_nodes=recipe.nnodes,
        nproc_per_node=recipe.nproc_per_node,
        run_id=job,
        rdzv_backend="c10d",
        rdzv_endpoint=recipe.rdzv_endpoint,
        rdzv_configs={"is_host": recipe.node_rank == 0, "join_timeout": 600},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    started = time.time()
    try:
        elastic_launch(config, sys.executable)("-m", "pipeline.train")
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        raise job_failed(recipe, job, failure_reason(rank, first.exitcode), started) from None
    run = job_run(job)
    if run is None:  # this machine's ranks were all followers
        return TrainResult("", None, float("nan"), 0, 0)
    metrics = run.data.metrics
    return TrainResult(
        run.info.run_id,
        run.data.tags.get("model_uri"),
        metrics.get("best_val_accuracy", float("nan")),
        int(metrics.get("best_epoch", 0)),
        int(metrics.get("epochs_run", 0)),
    )
