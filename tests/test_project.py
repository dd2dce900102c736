"""The project's own promises: MLproject entry points, dependency lists in step, CI = README."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import tomllib
import yaml

from pipeline.cli import CONFIGS, MAIN_EXTRA, STAGES, build_parser
from pipeline.config import PromoteConfig, TrainConfig, coerce
from pipeline.model.architectures import option_owners
from scripts.write_mlproject import mlproject_text

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
    assert set(entry_points) == set(STAGES)
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


def load_entry_points() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def test_mlproject_is_generated_from_the_configs():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), (
        "MLproject is out of date: run python -m scripts.write_mlproject"
    )


def test_every_mlproject_default_means_the_config_default():
    """Read as MLflow reads it: each parameter is a config field, and its default (as the CLI will
    coerce it) is the dataclass default, or empty for "use experiments/<model>.yaml"."""
    for entry, spec in load_entry_points().items():
        config = TrainConfig if entry == "main" else CONFIGS[entry]
        hints = typing.get_type_hints(config)
        fields = {f.name: f for f in dataclasses.fields(config)}
        for name, parameter in spec["parameters"].items():
            assert isinstance(parameter, dict), f"{entry}.{name}: a value lost to a YAML comma?"
            if name in MAIN_EXTRA and entry == "main":
                assert coerce(str(parameter["default"]), bool, name) == MAIN_EXTRA[name]
                continue
            if entry in ("train", "main") and name in option_owners():
                assert parameter["default"] == "", f"{entry}.{name}: a model option's default"
                continue
            assert name in fields, f"{entry}: {name} is not a field of {config.__name__}"
            if "default" not in parameter or str(parameter["default"]) == "":
                continue
            field = fields[name]
            expected = (
                field.default_factory()
                if field.default_factory is not dataclasses.MISSING
                else field.default
            )
            actual = coerce(str(parameter["default"]), hints[name], name)
            assert actual == expected, f"{entry}.{name}: {actual!r} != {expected!r}"


def test_main_takes_what_train_takes_with_the_same_defaults():
    entry_points = load_entry_points()
    train, main = entry_points["train"]["parameters"], entry_points["main"]["parameters"]
    assert set(main) == (set(train) - {"resume_run_id"}) | set(MAIN_EXTRA)
    assert all(main[name] == train[name] for name in set(main) & set(train))


def test_promote_entry_point_sees_both_resnets():
    default = load_entry_points()["promote"]["parameters"]["architectures"]["default"]
    promoted = coerce(default, list[str], "architectures")
    assert promoted == PromoteConfig().architectures
    assert {"resnet18", "resnet18_pretrained"} <= set(promoted)


BENCHMARKS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text()
)

# Each benchmark's `--help` as `python -m benchmarks.<name> --help` gives it, all in one process:
# each alone would import torch and MLflow again (18 processes took 77 s, one takes a few).
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys, traceback
answers = {}
for name in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [f"benchmarks/{name}.py", "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code or 0
        except BaseException:
            code = 1
            traceback.print_exc()
    answers[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(answers), file=sys.__stdout__)
"""


@pytest.fixture(scope="module")
def benchmark_help() -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-c", HELP_OF_EACH, *BENCHMARKS],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_still_starts(script, benchmark_help):
    """Benchmarks are not run in CI, so at least their imports and arguments must hold."""
    answer = benchmark_help[script]
    assert answer["code"] == 0, answer["stderr"][-2000:]
    assert "usage:" in answer["stdout"]


def test_airbench_is_given_our_split_in_its_own_format(tmp_path):
    """benchmarks/vs_airbench.py: airbench loads `train.pt`/`test.pt` as uint8 NHWC images, int64
    labels and class names; they must hold exactly the images `train` trains and validates on."""
    import torch

    from benchmarks.vs_airbench import write_airbench_data
    from pipeline.data.sources import load_training_set, make_splits
    from tests.conftest import write_image_tree

    tree = write_image_tree(tmp_path / "folder", per_class=20)
    write_airbench_data(str(tree), tmp_path / "cifar10")
    splits = make_splits(load_training_set(str(tree)), val_fraction=0.1, seed=0)
    for name, part in (("train.pt", splits.train), ("test.pt", splits.val)):
        data = torch.load(tmp_path / "cifar10" / name, weights_only=True)
        assert data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (32, 32, 3)
        assert data["labels"].dtype == torch.int64
        assert torch.equal(data["images"], torch.from_numpy(part.images))
        assert data["labels"].tolist() == part.labels.tolist()
        assert data["classes"] == ["cat", "dog", "frog"]


DOCUMENTS = ("README.md", "ARCHITECTURE.md", "docs/*.md", "benchmarks/RESULTS.md")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: headings lowercased, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        for title in re.findall(r"^#+ (.+)$", markdown, re.M)
    }


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for pattern in DOCUMENTS:
        for document in sorted(ROOT.glob(pattern)):
            text = document.read_text()
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                linked = (document.parent / path) if path else document
                if not linked.exists():
                    broken.append(f"{document.relative_to(ROOT)}: {target} (no such file)")
                elif anchor and anchor not in heading_anchors(linked.read_text()):
                    broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_command = next(i for i, line in enumerate(readme.splitlines()) if line == "```bash")
    assert first_command < 40, "the first command should be on the first screen"
