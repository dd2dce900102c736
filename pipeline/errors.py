"""How problems a user can fix are said: the one base class (the CLI prints its message without a
traceback), and hints that name options the way the user typed them.

Messages are written once, in the MLflow Project's form (`-P lr=0.01`, `mlflow run . -e train
--env-manager local`); what a person reads is turned into the `cifar10` command's form
(`--lr=0.01`, `cifar10 train`) when that is how they started. The form is chosen at the edge and
handed to child processes (`main`'s steps) in an environment variable, so a step that `cifar10 main`
runs through `mlflow run` still answers in the CLI's form.
"""

from __future__ import annotations

import os
import re


class PipelineError(RuntimeError):
    """A problem with input, data, weights or settings; the message names it and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, as a decision: the message says what stopped, what was kept and how to go on.
    A KeyboardInterrupt still, so that nothing that catches errors (Optuna's trial loop) goes on."""


FORM_VARIABLE = "CIFAR10_OPTION_FORM"
MLFLOW_FORM, CLI_FORM = "mlflow", "cli"

MLFLOW_RUN_COMMAND = re.compile(r"mlflow run \. -e (\w+) --env-manager local")
PROJECT_PARAMETER = re.compile(r"-P (?!name=value)([a-z][a-z0-9_]*)(=?)")


def choose_option_form() -> None:
    """The form of this process and its children: inherited, else `mlflow run`'s when it started
    this process (it sets MLFLOW_RUN_ID), else the CLI's."""
    form = os.environ.get(FORM_VARIABLE) or (
        MLFLOW_FORM if os.environ.get("MLFLOW_RUN_ID") else CLI_FORM
    )
    os.environ[FORM_VARIABLE] = form


def in_users_form(text: str) -> str:
    """`text` with its commands and options as the user gives them (unchanged unless the CLI
    started this process)."""
    if os.environ.get(FORM_VARIABLE) != CLI_FORM:
        return text
    text = MLFLOW_RUN_COMMAND.sub(r"cifar10 \1", text)
    return PROJECT_PARAMETER.sub(lambda m: f"--{m.group(1).replace('_', '-')}{m.group(2)}", text)
