"""Config dataclasses for every entry point, parsed once at the edge.

Precedence, lowest first: dataclass defaults < `experiments/<model>.yaml` < the file given as `config`
< explicit CLI / MLproject parameters. Values arrive as strings from MLproject, so they are coerced to
the field's declared type here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from pipeline.errors import PipelineError
from pipeline.model.drift import DEFAULT_ALPHA, DEFAULT_WINDOW, MIN_WINDOW
from pipeline.model.micro_batcher import MICRO_BATCH_DEFAULTS

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ConfigError(PipelineError):
    """A config value or file a user can fix; the message says how."""


@dataclass(frozen=True)
class EntryPoint:
    """An MLproject entry point and CLI command: its name, the stage function it runs (imported only
    then) and its one-line help. Declaring one on a config class is what makes the command."""

    name: str
    runs: str  # "module:function"
    help: str


# Help shared by the options several entry points take.
DATA_DIR_HELP = (
    "image-folder tree, archive of one, official CIFAR-10 batches, or 'synthetic'; only the "
    "default 'data' downloads CIFAR-10"
)
VAL_FRACTION_HELP = "share of the training images held out (stratified) for validation"
SEED_HELP = "seed of the validation split, the initialization and the augmentation"
DOWNLOAD_HELP = "download CIFAR-10 into data_dir when absent (default: only for 'data')"
SKIP_BAD_IMAGES_HELP = "skip unreadable files instead of stopping (they are logged)"
EXPERIMENT_NAME_HELP = "the MLflow experiment (default: cifar10)"
MAX_TRAIN_IMAGES_HELP = (
    "train on at most this many of the training split's images (class balance kept; 0 = all); "
    "validation is never capped"
)
EPOCHS_HELP = "passes over the training split"
BATCH_SIZE_HELP = (
    "images per training step (train; scaled to small sets when it comes from the recipe) or per "
    "scoring chunk (evaluate, predict)"
)
TTA_HELP = (
    "average with the mirrored image (flip test-time augmentation); train: in validation and as "
    "the logged model's default; evaluate, predict: default the model's"
)
MODEL_URI_HELP = (
    "an MLflow model URI: runs:/<run_id>/model, models:/m-<id>, models:/cifar10-resnet@champion"
)


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|min)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `15m`, `1.5h` (a bare number is seconds)."""
    found = DURATION.match(text)
    if not found:
        raise ConfigError(f"time_budget {text!r} is not a duration; write it like 90s, 15m or 1h.")
    scale = {"h": 3600, "m": 60, "min": 60}.get(found.group(2) or "s", 1)
    return float(found.group(1)) * scale


def option(default: Any, help: str) -> Any:
    """A config field with the text `--help` shows for it beside it."""
    return field(default=default, metadata={"help": help})


def required(help: str) -> Any:
    """A field the user must give (empty until then): MLproject and --help mark it required."""
    return field(default="", metadata={"required": True, "help": help})


def field_help(config: type, name: str) -> str:
    """The help text of one field of a config class ("" when it has none)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def is_required(config: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("required") for f in dataclasses.fields(config))


@dataclass
class PreprocessConfig:
    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "preprocess",
        "pipeline.preprocess:run_preprocess",
        "check the data (unusable files, class counts), statistics and plots",
    )

    data_dir: str = option("data", DATA_DIR_HELP)
    val_fraction: float = option(0.1, VAL_FRACTION_HELP)
    seed: int = option(0, SEED_HELP)
    download: bool | None = option(None, DOWNLOAD_HELP)
    skip_bad_images: bool = option(False, SKIP_BAD_IMAGES_HELP)
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)

    def __post_init__(self) -> None:
        check_fraction("val_fraction", self.val_fraction)


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "train",
        "pipeline.train:run_train",
        "train one model; a tracked run that ends with a logged, servable model",
    )

    model: str = "cnn"
    data_dir: str = option("data", DATA_DIR_HELP)
    val_fraction: float = option(0.1, VAL_FRACTION_HELP)
    seed: int = option(0, SEED_HELP)
    max_train_images: int = option(0, MAX_TRAIN_IMAGES_HELP)
    download: bool | None = option(None, DOWNLOAD_HELP)
    skip_bad_images: bool = option(False, SKIP_BAD_IMAGES_HELP)
    epochs: int = option(20, EPOCHS_HELP)
    batch_size: int = option(128, BATCH_SIZE_HELP)
    eval_batch_size: int = option(512, "images per validation forward pass")
    optimizer: str = option("adamw", "adamw or sgd (Nesterov)")
    lr: float = option(2e-3, "peak learning rate (scaled with a recipe batch size that was scaled)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "decoupled (AdamW) or L2 (SGD) weight decay")
    schedule: str = option("onecycle", "onecycle, cosine or constant")
    warmup_fraction: float = option(0.2, "share of the steps spent warming the learning rate up")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    crop_padding: int = option(4, "pixels of padding for random crops (0 = no crops)")
    flip: bool = option(True, "random horizontal flips")
    cutout: int = option(0, "side of a random square blanked in each image (0 = off)")
    tta: bool = option(False, TTA_HELP)
    bias_lr_factor: float = option(
        1.0, "learning-rate factor for normalization biases (their weight decay per step unchanged)"
    )
    lookahead_steps: int = option(
        0,
        "every this many steps the weights move to their running average, whose decay grows "
        "towards the end of training (airbench's lookahead: 5; 0 = off)",
    )
    precision: str = option(
        "auto",
        "auto (bfloat16 where the device computes it natively: CUDA, CPUs with AVX512-BF16 or "
        "AMX), bf16 or fp32",
    )
    patience: int = option(
        0, "stop after this many epochs without a better validation accuracy (0 = never)"
    )
    # The model's own options (pipeline/model/architectures.py declares them with defaults); every one is filled.
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = option(False, "start from ImageNet weights (resnet18_pretrained, vgg16_*)")
    weights_path: str | None = option(
        None, "a local file of ImageNet weights, instead of torchvision's download"
    )
    freeze_epochs: int = option(0, "vgg16_finetune: epochs with frozen features before unfreezing")
    finetune_lr_factor: float = option(0.1, "vgg16_finetune: learning-rate factor once unfrozen")
    compile: bool = option(False, "torch.compile the model (CUDA)")
    checkpoint_seconds: float = option(
        60.0, "write a resume checkpoint at most this often (and after the last epoch)"
    )
    keep_checkpoints: bool = option(
        False, "keep the resume checkpoints of a finished run (they are deleted otherwise)"
    )
    stop_if_not_learning: bool = option(
        True, "stop a run the watchdog finds at chance after 3 epochs or diverging"
    )
    # Recipe values (batch_size, lr) that came from experiments/<model>.yaml alone, so that
    # `scaled_to_data` may adapt them to the training-set size; never an explicit value.
    from_recipe: list[str] = field(default_factory=list)
    resume_run_id: str | None = option(
        None, "continue this killed or failed train run where it stopped"
    )
    time_budget: str = option(
        "",
        "the whole run's time (90s, 15m, 1h): a probe here sets the epochs that fit (empty: "
        "epochs as given)",
    )
    nproc_per_node: int = option(
        1, "processes on this machine (torch.distributed: one per GPU, or CPU processes)"
    )
    nnodes: int = option(1, "machines in the job (each runs the same command)")
    node_rank: int = option(0, "this machine's place among nnodes (0 hosts the rendezvous)")
    rdzv_endpoint: str = option(
        "127.0.0.1:29400", "host:port of the rendezvous (machine 0), the same on every machine"
    )
    sync_batch_norm: bool = option(
        True, "several CUDA processes: batch norm over the global batch (CPU: each process's share)"
    )
    collective_timeout_s: float = option(
        300.0, "a process that waits this long for its peers gives up (a peer died)"
    )
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)
    config: str | None = option(
        None, "a YAML file of train parameters (e.g. tune's best_config.yaml) over the model's"
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def __post_init__(self) -> None:
        check_fraction("val_fraction", self.val_fraction)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.max_train_images < 0:
            raise ConfigError("max_train_images must be 0 (all images) or a positive count.")
        if self.lookahead_steps < 0:
            raise ConfigError(
                f"lookahead_steps must be 0 (off) or a step count such as 5, "
                f"got {self.lookahead_steps}."
            )
        if self.bias_lr_factor <= 0:
            raise ConfigError(f"bias_lr_factor must be positive, got {self.bias_lr_factor}.")
        if self.time_budget:
            parse_duration(self.time_budget)
        if self.nproc_per_node < 1 or self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"nproc_per_node and nnodes must be at least 1 and node_rank in 0..nnodes-1, got "
                f"{self.nproc_per_node}, {self.nnodes} and {self.node_rank}."
            )
        if self.world_size > 1 and self.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} does not divide among {self.world_size} processes "
                f"(nproc_per_node x nnodes); use a multiple of {self.world_size}, e.g. "
                f"{self.batch_size - self.batch_size % self.world_size or self.world_size}: it is "
                "the global batch, split evenly."
            )
        choices = {
            "optimizer": ("adamw", "sgd"),
            "schedule": ("onecycle", "cosine", "constant"),
            "precision": PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")


@dataclass
class EvaluateConfig:
    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "evaluate",
        "pipeline.evaluate:run_evaluate",
        "score a logged model on a test split or a held-out folder: metrics, plots, Grad-CAM",
    )

    model_uri: str = required(
        "an MLflow model URI: runs:/<run_id>/model, models:/m-<id>, models:/cifar10-resnet@champion"
    )
    data_dir: str = option("data", DATA_DIR_HELP)
    test_dir: str | None = option(
        None,
        "evaluate: a held-out folder or archive of class folders (held_out/<class>/*), read whole"
        " as the test split instead of data_dir's",
    )  # a held-out folder (or archive) of class folders, read whole
    batch_size: int = option(500, BATCH_SIZE_HELP)
    tta: bool | None = option(
        None, TTA_HELP
    )  # None: the model's own default (what its validation used)
    gradcam_per_class: int = option(2, "Grad-CAM overlays per class (0 = none)")
    download: bool | None = option(None, DOWNLOAD_HELP)
    skip_bad_images: bool = option(False, SKIP_BAD_IMAGES_HELP)
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ConfigError(
                "model_uri is required, e.g. runs:/<run_id>/model or "
                "models:/cifar10-resnet@champion."
            )


@dataclass
class TuneConfig:
    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "tune",
        "pipeline.tune:run_tune",
        "an Optuna study over experiments/search_spaces/<model>.yaml",
    )

    model: str = "cnn"
    n_trials: int = option(20, "trials to finish in this study (all workers together)")
    epochs: int = option(10, EPOCHS_HELP)
    max_train_images: int = option(0, MAX_TRAIN_IMAGES_HELP)
    data_dir: str = option("data", DATA_DIR_HELP)
    skip_bad_images: bool = option(False, SKIP_BAD_IMAGES_HELP)
    val_fraction: float = option(0.1, VAL_FRACTION_HELP)
    storage: str | None = option(
        None, "Optuna storage URL (default: optuna.db beside the tracking store)"
    )
    study_name: str | None = option(None, "the study to create or resume (default: <model>-tune)")
    seed: int = option(0, SEED_HELP)
    sampler_seed: int | None = option(None, "TPE seed of this worker (default: seed)")
    startup_trials: int = option(10, "random trials before TPE takes over")
    n_jobs: int = option(1, "trials in threads of this process (prefer more processes on a CPU)")
    pruner: str = option("median", "median, hyperband or none")
    prune_after_epochs: int = option(0, "judge no trial before this epoch (default: 3/4 of epochs)")
    search_space: str | None = option(
        None, "a YAML search space (default: experiments/search_spaces/<model>.yaml)"
    )
    timeout_seconds: float | None = option(None, "stop starting trials after this many seconds")
    trial_time_budget: str = option(
        "", "each trial's time (90s, 15m): its epochs are those that fit, as train's time_budget"
    )
    heartbeat_seconds: int = option(
        30, "Optuna heartbeat; a worker silent for 3 beats has its trial retried"
    )
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)

    def __post_init__(self) -> None:
        check_fraction("val_fraction", self.val_fraction)
        if self.heartbeat_seconds < 1:
            raise ConfigError(
                f"heartbeat_seconds must be at least 1, got {self.heartbeat_seconds}."
            )
        if self.pruner not in ("median", "hyperband", "none"):
            raise ConfigError(f"pruner must be median, hyperband or none, got {self.pruner!r}.")
        if self.trial_time_budget:
            parse_duration(self.trial_time_budget)
        if self.n_trials < 1 or self.epochs < 1 or self.n_jobs < 1 or self.startup_trials < 1:
            raise ConfigError(
                "n_trials, epochs, n_jobs and startup_trials must each be at least 1."
            )


@dataclass
class PromoteConfig:
    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "promote",
        "registry.promote:run_promote",
        "register the best ResNet or fastnet and move the champion alias, if it earns it",
    )

    model_name: str = option("cifar10-resnet", "the registered model")
    metric: str = option("best_val_accuracy", "the validation metric candidates are ranked by")
    candidate_experiment: str | None = option(
        None, "look for candidates in this experiment instead"
    )
    # fastnet earns its place: the one architecture that trains a servable champion on a CPU.
    architectures: list[str] = field(
        default_factory=lambda: ["resnet18", "resnet18_pretrained", "fastnet"],
        metadata={"help": "comma-separated architectures that may be promoted"},
    )
    min_delta: float = option(0.0, "a challenger must beat the champion by at least this accuracy")
    min_accuracy: float = option(0.0, "a first champion needs at least this validation accuracy")
    alpha: float = option(0.05, "significance level of the promotion tests")
    force: bool = option(False, "promote the best candidate without the gates")
    rollback: bool = option(False, "swap the champion and previous aliases back")
    batch_size: int = option(500, BATCH_SIZE_HELP)
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)


@dataclass
class PredictConfig:
    """Batch scoring of unlabelled images: `input` a folder (searched recursively), an archive
    or a glob; `output` a .csv or .parquet file; `engine` local or spark."""

    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "predict",
        "pipeline.predict:run_predict",
        "score a folder, archive or glob of unlabelled images into a .csv/.parquet table",
    )

    model_uri: str = required(
        "an MLflow model URI: runs:/<run_id>/model, models:/m-<id>, models:/cifar10-resnet@champion"
    )
    input: str = required("folder (recursive), archive or glob of images to score")
    output: str = required("the table to write: a .csv or .parquet file")
    engine: str = option("local", "local or spark")
    spark_master: str = option("local[*]", "Spark master URL (local[*], spark://host:7077)")
    # Small chunks keep a CPU forward pass's activations in reused heap memory (measured:
    # benchmarks/RESULTS.md, Spark against the local engine).
    batch_size: int = option(64, BATCH_SIZE_HELP)
    tta: bool | None = option(
        None, TTA_HELP
    )  # None: the model's own default (what its validation used)
    explain: bool = option(
        False, "add each image's Grad-CAM map (explained_class, heatmap_png columns; local engine)"
    )
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)

    def __post_init__(self) -> None:
        for name, example in (
            ("model_uri", "models:/cifar10-resnet@champion or runs:/<run_id>/model"),
            ("input", "a folder of images, an archive (.tar.gz, .zip) or a glob ('photos/*.jpg')"),
            ("output", "predictions.csv or predictions.parquet"),
        ):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required, e.g. {example}.")
        if not self.output.lower().endswith((".csv", ".parquet")):
            raise ConfigError(
                f"output must end in .csv or .parquet, got {self.output!r}; e.g. -P "
                "output=predictions.parquet."
            )
        if self.engine not in ("local", "spark"):
            raise ConfigError(f"engine must be local or spark, got {self.engine!r}.")
        check_scoring_batch(self.batch_size)
        if self.explain and self.engine == "spark":
            raise ConfigError(
                "explain works with engine=local (Spark's result columns are fixed); score with "
                "-P engine=local -P explain=true, or leave explain off on Spark."
            )


@dataclass
class ServeConfig:
    """The hardened server. The token itself is no parameter (`mlflow run` logs parameters, and a
    command line shows in `ps`): it comes from CIFAR10_SERVE_TOKEN or the file `token_file`."""

    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "serve",
        "registry.server:run_serve",
        "the model over MLflow's, v2 and KServe v1 protocols and a page, behind a token and limits",
    )

    model_uri: str = option("models:/cifar10-resnet@champion", MODEL_URI_HELP)
    served_name: str = option(
        "",
        "the name v2 / v1 clients call (/v2/models/<name>); default: the registered model's name,"
        " or cifar10",
    )
    host: str = option("127.0.0.1", "address to listen on (beyond loopback a token is required)")
    port: int = option(5001, "TCP port to listen on")
    workers: int = option(1, "uvicorn worker processes, each with its share of the cores")
    token_file: str = option("", "file holding the bearer token (or set CIFAR10_SERVE_TOKEN)")
    allow_unauthenticated: bool = option(False, "serve a public address without a token")
    max_body_mb: float = option(16.0, "largest request body accepted")
    max_json_depth: int = option(32, "deepest JSON nesting accepted")
    timeout_s: int = option(60, "seconds a request may take")
    max_inflight: int = option(
        64, "scoring requests a worker answers at once; more get 503 with Retry-After"
    )
    max_batch_images: int = option(
        MICRO_BATCH_DEFAULTS["max_batch_images"],
        "micro-batching: most images in one forward pass (1 = off)",
    )
    batch_wait_ms: float = option(
        MICRO_BATCH_DEFAULTS["batch_wait_ms"],
        "micro-batching: longest wait for requests already decoding",
    )
    drift_window: int = option(
        DEFAULT_WINDOW, "recent images compared with the training data on /metrics (0 = off)"
    )
    inference_log: str = option(
        "", "folder or s3://bucket/prefix for the inference log's Parquet files (empty = off)"
    )
    log_sample: float = option(1.0, "inference log: share of answered images written")
    log_images: bool = option(False, "inference log: keep each image's bytes too")
    log_max_image_kb: float = option(64.0, "inference log: larger images are kept without bytes")
    log_rotate_rows: int = option(1000, "inference log: rows per file")
    log_rotate_s: float = option(60.0, "inference log: longest wait before a file is written")
    log_max_mb: float = option(1024.0, "inference log: a local folder's cap (oldest files go)")

    def __post_init__(self) -> None:
        for name in (
            "port",
            "workers",
            "max_json_depth",
            "timeout_s",
            "max_inflight",
            "max_batch_images",
            "log_rotate_rows",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if 0 < self.drift_window < MIN_WINDOW:
            raise ConfigError(
                f"drift_window must be 0 (off) or at least {MIN_WINDOW} images, got "
                f"{self.drift_window}; "
                f"the calibrated default is {DEFAULT_WINDOW}."
            )
        if self.max_body_mb <= 0 or self.batch_wait_ms < 0:
            raise ConfigError(
                "max_body_mb must be positive and batch_wait_ms not negative, got "
                f"{self.max_body_mb} and {self.batch_wait_ms}."
            )
        if not 0 < self.log_sample <= 1:
            raise ConfigError(
                f"log_sample must be above 0 and at most 1, got {self.log_sample}; "
                "0.1 writes every tenth image."
            )
        if min(self.log_max_image_kb, self.log_rotate_s, self.log_max_mb) <= 0:
            raise ConfigError("log_max_image_kb, log_rotate_s and log_max_mb must be positive.")


@dataclass
class MonitorConfig:
    """Drift of served (or any) images against the model's reference, as a run with a verdict."""

    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "monitor",
        "pipeline.monitor:run_monitor",
        "compare the inference log or a folder of images with the model's training reference",
    )

    source: str = required(
        "the serve inference log (its folder or s3://bucket/prefix), or a folder, archive or glob "
        "of images"
    )
    model_uri: str = option("models:/cifar10-resnet@champion", MODEL_URI_HELP)
    window: int = option(1000, "the most recent rows of the log (or images) compared (0 = all)")
    alpha: float = option(DEFAULT_ALPHA, "significance of the combined test; drift below it")
    fail_on_drift: bool = option(False, "exit non-zero when the verdict is drift (scheduled jobs)")
    batch_size: int = option(256, "images per scoring chunk (a folder of images)")
    experiment_name: str | None = option(None, EXPERIMENT_NAME_HELP)

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError(
                "source is required: the inference log's folder (serve -P inference_log=...), an "
                "s3://bucket/prefix, or a folder of images."
            )
        if self.window != 0 and self.window < MIN_WINDOW:
            raise ConfigError(
                f"window must be 0 (all) or at least {MIN_WINDOW} images, got {self.window}."
            )
        check_fraction("alpha", self.alpha)
        check_scoring_batch(self.batch_size)


@dataclass
class RepairStoreConfig:
    """Every stage repairs a half-migrated SQLite store on its own; this checks one on demand."""

    ENTRY: ClassVar[EntryPoint] = EntryPoint(
        "repair_store",
        "pipeline.tracking.store_repair:run_repair_store",
        "find and repair an embedded SQLite tracking store left half-migrated (backed up first)",
    )

    tracking_uri: str = option(
        "", "the store to check, sqlite:///<file> (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )


def entry_point_configs() -> dict[str, type]:
    """Every config class that declares an entry point, by command name, in the order above."""
    return {
        value.ENTRY.name: value
        for value in globals().values()
        if isinstance(value, type) and isinstance(getattr(value, "ENTRY", None), EntryPoint)
    }


def check_scoring_batch(batch_size: int) -> None:
    """Images per scoring chunk: within the served model's per-request limit."""
    if not 1 <= batch_size <= 1024:
        raise ConfigError(f"batch_size must be between 1 and 1024, got {batch_size}.")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be between 0 and 1 (exclusive), got {value}.")


C = TypeVar("C")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass an existing YAML file.")
    with path.open() as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of parameter names to values.")
    return content


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Turn a YAML or command-line value into the field's declared type."""
    if value is None:
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() in ("", "none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}.")
    if typing.get_origin(annotation) is dict:
        return dict(value)
    if typing.get_origin(annotation) is list:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(item).strip() for item in items if str(item).strip()]
    try:
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return annotation(float(value)) if annotation is int else annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {annotation.__name__}, got {value!r}.") from None


def build_config(cls: type[C], *layers: Mapping[str, Any]) -> C:
    """Merge layers (later wins) onto the defaults of `cls`, coercing and validating each value."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise ConfigError(
                    f"Unknown parameter {key!r} for {cls.__name__}; valid names: {sorted(known)}."
                )
            values[key] = coerce(value, hints[key], key)
    return cls(**values)


def model_defaults_path(model: str) -> Path:
    return EXPERIMENTS_DIR / f"{model}.yaml"


def resolve_train_config(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults < experiments/<model>.yaml < `config` file < explicit overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config_file = read_yaml(overrides["config"]) if overrides.get("config") else {}
    model = overrides.get("model") or config_file.get("model") or TrainConfig.model
    defaults_path = model_defaults_path(model)
    model_defaults = read_yaml(defaults_path) if defaults_path.is_file() else {}
    from_recipe = [
        name
        for name in SCALED_FIELDS
        if name in model_defaults and name not in config_file and name not in overrides
    ]
    return train_config_from(
        model,
        model_defaults,
        config_file,
        {**overrides, "model": model, "from_recipe": from_recipe},
    )


# The recipe values that `pipeline/training/recipes.py:scaled_to_data` may adapt to the training-set size.
SCALED_FIELDS = ("batch_size", "lr")


def train_config_from(model: str, *layers: Mapping[str, Any]) -> TrainConfig:
    """Flat layers (YAML files, parameters, a logged config.yaml) -> a TrainConfig: the names that
    `model` declares as options go to `options`, coerced to the type of their default."""
    from pipeline.model.architectures import get_spec, option_owners

    declared = get_spec(model).options
    owners = option_owners()
    options = dict(declared)
    plain_layers = []
    for layer in layers:
        plain = {}
        for key, value in layer.items():
            if key in declared:
                default = declared[key]
                options[key] = coerce(value, type(default), key) if default is not None else value
            elif key in owners:
                raise ConfigError(
                    f"{key!r} is an option of {', '.join(owners[key])}, not of {model} (its "
                    f"options: {sorted(declared) or 'none'}); drop it or choose another model."
                )
            else:
                plain[key] = value
        plain_layers.append(plain)
    return build_config(TrainConfig, *plain_layers, {"options": options, "model": model})


def config_to_params(config: Any) -> dict[str, Any]:
    """The resolved config as flat MLflow params (None shown as an empty string); a model's
    options stand beside the other fields, as in its YAML file."""
    values = dataclasses.asdict(config)
    values |= values.pop("options", None) or {}
    return {k: ("" if v is None else v) for k, v in values.items()}


def dump_yaml(values: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(values), sort_keys=False)


# What each option means, for `--help` (one text per name; the same name means the same thing in
# every stage). The defaults come from the dataclasses above (and for train from the model's YAML).
