"""The only place that reads arguments: one subcommand per MLproject entry point.

Every option defaults to None, meaning "not given": the config layers (dataclass defaults,
experiments/*.yaml, a `config` file) decide the value. MLproject passes "" for parameters the user
did not set, which counts as not given too.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import (
    TrainConfig,
    build_config,
    config_to_params,
    entry_point_configs,
    field_help,
    model_defaults_path,
    read_yaml,
    resolve_train_config,
)
from pipeline.errors import Interrupted, PipelineError, choose_option_form, in_users_form

DESCRIPTION = """CIFAR-10 (or your own image folders) from raw images to a served model, every step
tracked in MLflow. Each command is also an MLflow Project entry point: `mlflow run . -e <command>
--env-manager local -P name=value` takes the same options. `cifar10 <command> --help` lists a
command's options with their defaults. Start with: cifar10 main --data-dir <images> --model fastnet"""

CONFIGS: dict[str, type] = entry_point_configs()
MAIN_EXTRA = {"force_rerun": False}
MAIN_EXTRA_HELP = {"force_rerun": "run every step again instead of reusing finished ones"}


@functools.cache
def train_options() -> tuple[str, ...]:
    """`train` takes its config's fields and every model option of the registry (each model checks
    its own); imported only when a command needs them, since the registry imports torch."""
    from pipeline.model.architectures import option_owners

    fields = (f.name for f in dataclasses.fields(TrainConfig))
    return (*(n for n in fields if n not in ("options", "from_recipe")), *option_owners())


@functools.cache
def main_options() -> tuple[str, ...]:
    """`main` takes the same (but resuming, which is one run's business) and force_rerun."""
    return (*(name for name in train_options() if name != "resume_run_id"), *MAIN_EXTRA)


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "MAIN_OPTIONS":  # for the MLproject generator and the tests
        return main_options()
    raise AttributeError(name)


def given(value: str) -> str | None:
    return value if value != "" else None


# `main` is the one command without a config of its own: train's options and force_rerun.
MAIN_HELP = "preprocess -> train -> evaluate -> promote, reusing finished steps"
STAGE_HELP = {name: config.ENTRY.help for name, config in CONFIGS.items()} | {"main": MAIN_HELP}


def option_defaults(stage: str) -> dict[str, str]:
    """What each option is when not given, as --help shows it."""
    if stage in ("train", "main"):
        recipe = {k: str(v) for k, v in config_to_params(resolve_train_config({})).items()}
        return recipe | {k: str(v) for k, v in MAIN_EXTRA.items()}
    defaults = {}
    for f in dataclasses.fields(CONFIGS[stage]):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        defaults[f.name] = "required" if f.metadata.get("required") else str(value)
    return defaults


def option_help(name: str, stage: str | None = None) -> str:
    """The option's description: its field's help (the stage's own first), or a model option's
    help with the models that take it."""
    if name == "model":
        from pipeline.model.architectures import model_names

        return f"architecture: {', '.join(model_names())}"
    if name in MAIN_EXTRA_HELP:
        return MAIN_EXTRA_HELP[name]
    own = TrainConfig if stage == "main" else CONFIGS.get(stage or "")
    for config in ([own] if own else []) + list(CONFIGS.values()):
        if text := field_help(config, name):
            return text
    from pipeline.model.architectures import described_option

    return described_option(name)


def add_options(parser: argparse.ArgumentParser, stage: str, names: Sequence[str]) -> None:
    defaults = option_defaults(stage)
    # A server installed without the checkout (the container) has no experiments/ to show.
    recipe = model_defaults_path(TrainConfig.model)
    recipe_keys = set()
    if stage in ("train", "main") and recipe.is_file():
        recipe_keys = set(read_yaml(recipe)) - {"model"}
    for name in names:
        default = defaults.get(name)
        shown = "" if default in (None, "", "None") else f" (default: {default})"
        if default == "required":
            shown = " (required)"
        elif name in recipe_keys:
            shown = f" (cnn's recipe: {default}; each model's in experiments/<model>.yaml)"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=given,
            metavar="VALUE",
            help=option_help(name, stage) + shown,
        )


def unknown_option_message(stage: str, unknown: list[str]) -> str:
    """One line for options the stage does not take, with the nearest names."""
    names = [
        n.replace("_", "-") for n in (main_options() if stage == "main" else stage_options(stage))
    ]
    parts = []
    for token in (t for t in unknown if t.startswith("--")):
        name = token[2:].split("=", 1)[0].replace("_", "-")
        close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
        parts.append(
            f"--{name}"
            + (f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else "")
        )
    listed = ", ".join(parts) or " ".join(unknown)
    return (
        f"{stage} does not take {listed}. `cifar10 {stage} --help` lists its options (with "
        "mlflow run: -P name=value, the same names)."
    )


def stage_options(stage: str) -> list[str]:
    """The options of one entry point (`main` apart), as MLproject lists them too."""
    if stage == "train":
        return list(train_options())
    return [f.name for f in dataclasses.fields(CONFIGS[stage])]


def build_overview_parser() -> argparse.ArgumentParser:
    """The commands alone: what `cifar10 --help` shows, without importing torch for the options."""
    parser = argparse.ArgumentParser(prog="cifar10", description=DESCRIPTION)
    stages = parser.add_subparsers(dest="stage", metavar="command", required=True)
    for stage in [*CONFIGS, "main"]:
        stages.add_parser(stage, help=STAGE_HELP[stage], add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar10", description=DESCRIPTION)
    stages = parser.add_subparsers(dest="stage", required=True)
    for stage in CONFIGS:
        sub = stages.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage])
        add_options(sub, stage, stage_options(stage))
    main_parser = stages.add_parser("main", help=STAGE_HELP["main"], description=STAGE_HELP["main"])
    add_options(main_parser, "main", main_options())
    return parser


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "stage" and v is not None}


STAGES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    name: (
        resolve_train_config if config is TrainConfig else functools.partial(build_config, config),
        config.ENTRY.runs,
    )
    for name, config in CONFIGS.items()
} | {"main": (dict, "pipeline.workflow:run_main")}


def torch_pair_problem(torch_version: str, torchvision_version: str) -> str | None:
    """Why an installed torch and torchvision do not belong together, with the command that
    fixes it; None when they do. torchvision 0.(N+15) is built for torch 2.N, and a CPU build
    (`+cpu`) beside a CUDA one fails at import (`operator torchvision::nms does not exist`)."""
    torch_base, _, torch_build = torch_version.partition("+")
    vision_base, _, vision_build = torchvision_version.partition("+")
    major, minor = (int(part) for part in torch_base.split(".")[:2])
    expected = f"0.{minor + 15}"
    same_kind = (torch_build == "cpu") == (vision_build == "cpu")  # cu121 beside PyPI's works
    if major == 2 and vision_base.startswith(expected + ".") and same_kind:
        return None
    index = f" --index-url https://download.pytorch.org/whl/{torch_build}" if torch_build else ""
    return (
        f"torch {torch_version} and torchvision {torchvision_version} do not belong together "
        f"(torch {torch_base} needs torchvision {expected}.x of the same build). Fix: pip install "
        f"--force-reinstall torch=={torch_base} torchvision=={expected}.*{index}"
    )


def check_torch_pair() -> None:
    """Name a broken torch / torchvision pair in one line before anything imports them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        problem = torch_pair_problem(version("torch"), version("torchvision"))
    except (PackageNotFoundError, ValueError):
        return  # not installed as distributions: the import itself will say what is missing
    if problem:
        raise PipelineError(problem)


def dispatch(args: argparse.Namespace) -> None:
    """Build the stage's config, then import the stage (lazily, so --help and bad input answer fast)."""
    make_config, target = STAGES[args.stage]
    check_torch_pair()
    config = make_config(given_options(args))
    if args.stage not in ("serve", "repair_store"):  # serve reads the store; repair_store mends it
        from pipeline.tracking.store_repair import prepare_tracking_store

        prepare_tracking_store()
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(config)


# MLflow's client retries a failed call 7 times, the waits doubling from 4 s to a 120 s cap, so it
# gives up after ~4 minutes of tracking-server outage and a blocked call goes on only at its next
# scheduled try (measured, 60 s outage: training stood still 58-61 s after the server was back).
# Waits doubling from 2 s over ten tries survive ~8 minutes; after a 60 s outage the next try is at
# 62 s or 126 s (RESULTS.md, Faults). Either variable set by the user wins.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
}


def name_refused_run(stage: str, message: str) -> None:
    """Under `mlflow run` the run exists before this process starts, named at random; one this
    process refuses is named for what it was and says why."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient()
        if client.get_run(run_id).info.lifecycle_stage == "active":
            client.set_tag(run_id, "mlflow.runName", f"{stage} · refused")
            client.set_tag(run_id, "mlflow.note.content", message)
    except MlflowException:
        pass  # the store itself is the problem: the message already says so


def refuse(stage: str, message: str) -> None:
    print(f"error: {in_users_form(message)}", file=sys.stderr)
    name_refused_run(stage, message)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    choose_option_form()
    if not argv or argv[0] not in [*CONFIGS, "main"]:
        build_overview_parser().parse_args(argv)  # --help, or a one-line error for a bad command
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        refuse(args.stage, unknown_option_message(args.stage, unknown))
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not sys.stderr.isatty():
        # MLflow's artifact download bars redraw with carriage returns: noise in a log file.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        dispatch(args)
    except PipelineError as error:
        refuse(args.stage, str(error))
    except KeyboardInterrupt as interrupt:
        said = str(interrupt) if isinstance(interrupt, Interrupted) else ""
        print(
            in_users_form(
                f"interrupted: {said or f'{args.stage} stopped by Ctrl-C before it saved anything'}"
            ),
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
