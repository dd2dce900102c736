"""The README's quickstart, run as written from the project root: `main` on the shared subset ends
with a champion, and the serve command answers for it."""

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REAL_SUBSET

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.+?)\n```", readme, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.skipif(not REAL_SUBSET.is_dir(), reason=f"the shared subset is not at {REAL_SUBSET}")
@pytest.mark.slow
def test_the_quickstart_trains_a_champion_and_serves_it(tmp_path):
    main_command, serve_command = quickstart_commands()
    assert main_command[:2] == ["cifar10", "main"] and serve_command[:2] == ["cifar10", "serve"]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    log = tmp_path / "main.log"
    with log.open("w") as out:
        finished = subprocess.run(
            main_command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900
        )
    printed = log.read_text()
    assert finished.returncode == 0, printed[-3000:]
    assert "promotion: " in printed and "champion" in printed, printed[-3000:]
    client = mlflow.MlflowClient(tracking)
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert client.get_run(champion.run_id).data.tags["architecture"] == "fastnet"

    server_log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        serve_command, cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT
    )
    port = serve_command[serve_command.index("--port") + 1]
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer in 180 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.close()
