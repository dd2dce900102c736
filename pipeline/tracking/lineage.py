"""What a stage run consumed, as content digests: `main` reuses a step, `promote` compares models and
`evaluate` writes back only where these match, never on names or paths alone.

Three parts, each a tag on every stage run (and the whole in `lineage.json`):
- data: the content digest of each split the stage read (`lineage.data.<split>`);
- config: a digest of the resolved config, after YAML layers (`lineage.config`);
- code: the commit, plus a digest of uncommitted changes to the code paths (`lineage.code`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# What decides what a stage computes; an edit elsewhere (README, tests, benchmarks) reuses runs.
CODE_PATHS = ("pipeline", "registry", "experiments", "MLproject", "pyproject.toml", "conda.yaml")
DATA_TAG = "lineage.data."
CONFIG_TAG = "lineage.config"
CODE_TAG = "lineage.code"
DIRTY_TAG = "lineage.code_dirty"
# Fields that name a run, not what it computes.
RUN_ONLY_FIELDS = ("experiment_name", "resume_run_id", "config", "keep_checkpoints", "download")


def git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result if result.returncode == 0 else None


def git_commit() -> str:
    """The project's commit, or 'unknown' outside a git checkout."""
    result = git("rev-parse", "HEAD")
    return result.stdout.decode().strip() if result else "unknown"


def hash_files(hasher: Any, paths: list[Path]) -> None:
    for path in sorted(paths):
        if path.is_file():
            hasher.update(str(path.relative_to(PROJECT_ROOT)).encode() + b"\0")
            hasher.update(path.read_bytes() + b"\0")


@functools.cache
def code_state() -> tuple[str, str]:
    """(commit, digest of what differs from it in the code paths; "" when nothing does).

    Uncommitted edits to tracked files and untracked (not ignored) files count. Outside a git
    checkout the commit is 'unknown' and the digest covers every file of the code paths.
    """
    commit = git_commit()
    hasher = hashlib.blake2b(digest_size=8)
    if commit == "unknown":
        hash_files(hasher, [p for name in CODE_PATHS for p in (PROJECT_ROOT / name).rglob("*")])
        return commit, hasher.hexdigest()
    diff = git("diff", "HEAD", "--binary", "--", *CODE_PATHS)
    untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS)
    names = [n for n in (untracked.stdout.decode().split("\0") if untracked else []) if n]
    if not (diff and diff.stdout) and not names:
        return commit, ""
    hasher.update(diff.stdout if diff else b"")
    hash_files(hasher, [PROJECT_ROOT / n for n in names])
    return commit, hasher.hexdigest()


def code_identity() -> str:
    commit, dirty = code_state()
    return f"{commit}+{dirty}" if dirty else commit


def identity_config(params: Mapping[str, Any]) -> dict[str, str]:
    """The config values that decide what a stage computes, as strings (how MLflow logs them)."""
    return {
        k: "" if v is None else str(v)
        for k, v in sorted(params.items())
        if k not in RUN_ONLY_FIELDS
    }


def config_identity(params: Mapping[str, Any]) -> str:
    text = json.dumps(identity_config(params), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def identity(data: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """The tags that say what a stage consumed: split -> digest, the config, the code."""
    return {f"{DATA_TAG}{split}": digest for split, digest in data.items()} | {
        CONFIG_TAG: config_identity(params),
        CODE_TAG: code_identity(),
    }


def logged_identity(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k.startswith(DATA_TAG) or k in (CONFIG_TAG, CODE_TAG)}


def changed_parts(expected: Mapping[str, str], tags: Mapping[str, str]) -> list[str]:
    """What differs between an expected identity and a run's tags: `data (<splits>)`, `config`,
    `code`; a part the run did not record counts as changed."""
    logged = logged_identity(tags)
    splits = sorted(
        key.removeprefix(DATA_TAG)
        for key in (expected.keys() | logged.keys())
        if key.startswith(DATA_TAG) and expected.get(key) != logged.get(key)
    )
    parts = [f"data ({', '.join(splits)})"] if splits else []
    for tag, part in ((CONFIG_TAG, "config"), (CODE_TAG, "code")):
        if expected.get(tag) is None or expected.get(tag) != logged.get(tag):
            parts.append(part)
    return parts
