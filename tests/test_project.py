"""The project's own promises: MLproject entry points, dependency lists in step, CI = README."""

import re
from pathlib import Path

import tomllib
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_conda_and_pyproject_list_the_same_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip_section = next(d["pip"] for d in conda if isinstance(d, dict))
    assert sorted(pyproject) == sorted(d for d in pip_section if d != "-e .")


def test_torch_is_capped_at_the_allowed_release():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.4,<=2.14.1" in deps and "torchvision>=0.19,<=0.29.1" in deps


def test_mlproject_entry_points_call_the_cli_with_every_parameter():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    entry_points = project["entry_points"]
    assert set(entry_points) == {
        "preprocess",
        "train",
        "evaluate",
        "tune",
        "promote",
        "serve",
        "main",
    }
    parser = build_parser()
    for name, entry in entry_points.items():
        command = entry["command"]
        assert command.startswith(f"python -m pipeline.cli {name} ")
        for parameter in entry["parameters"]:
            assert f"--{parameter.replace('_', '-')} {{{parameter}}}" in command
        rendered = re.sub(r"\{(\w+)\}", "1", command).split()[4:]
        parser.parse_args([name, *rendered])


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash)?\n(.+?)\n```", readme, re.S)
    assert match, "README must show the test command after <!-- test-command -->"
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == match.group(1).strip()
