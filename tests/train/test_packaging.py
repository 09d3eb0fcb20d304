"""The wheel installs what it runs: README's "Installed, not from a checkout" block, run as written in a
copy of the checkout (build the wheel, a fresh venv, `pip install` with the extras and the lock as
constraints, `--cfg job` from outside the checkout), then two training iterations with the installed copy.

The copy keeps build/ and *.egg-info out of the checkout. pip finds torch's CPU wheel where this machine's
pip configuration points (CI: a local wheel directory); the other packages come from PyPI or pip's cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_readme_commands import readme_commands
from train_tiny import TINY_MODEL_OVERRIDES, write_tiny_corpus

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INSTALL_LINE = 'pip install -c requirements/lock.txt "dist/mtp_plugin-0.1.0-py3-none-any.whl[all]"'


def install_block() -> list[str]:
    """README's block that builds and installs the wheel: the fenced block around the install line."""
    commands = [command for command, _ in readme_commands()]
    at = next(n for n, command in enumerate(commands) if command.endswith(INSTALL_LINE))
    assert commands[at - 2].startswith("python -m pip wheel "), commands[at - 2 : at + 2]
    return commands[at - 2 : at + 2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packaging")
    checkout = root / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, checkout / name)
    shutil.copytree(REPO / "requirements", checkout / "requirements")
    shutil.copytree(
        REPO / "mtp_plugin", checkout / "mtp_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    # `.venv` active for the first line (this interpreter's environment); nothing of the checkout on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    block = install_block()
    proc = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(block)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, "\n".join(block) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    (whl,) = (checkout / "dist").glob("mtp_plugin-*.whl")
    return {
        "root": root,
        "python": root / "mtp-env" / "bin" / "python",
        "wheel": whl,
        "stdout": proc.stdout,
        "env": env,
    }


def test_wheel_ships_every_config_and_the_licence(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {
        "mtp_plugin/hydra_configs/" + str(p.relative_to(REPO / "mtp_plugin" / "hydra_configs"))
        for p in (REPO / "mtp_plugin" / "hydra_configs").rglob("*.yaml")
    }
    assert len(shipped) >= 15 and shipped <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(installed["wheel"]).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    assert "License-Expression: Apache-2.0" in metadata.decode()
    for extra in ("hydra", "megatron", "deepspeed", "all"):
        assert f"Provides-Extra: {extra}" in metadata.decode()


def test_the_readme_block_composes_a_config_outside_the_checkout(installed):
    out = installed["stdout"]
    # The block's last line ran `--cfg job` from the directory above the checkout copy (after pip's output).
    summary = out[out.index("# MTP D = ") :]
    assert summary.startswith("# MTP D = 2 (w_k = 1/D), λ 0.3, then 0.1 from "), out[-3000:]
    assert "name: toy_demo" in out and "num_depths: 2" in out
    assert not (installed["root"] / "outputs").exists()  # --cfg prints the config and runs nothing


def test_the_installed_copy_trains(installed, tmp_path):
    """The extras hold what a run imports: two iterations of the tiny MoE with D = 2 from outside the
    checkout, with nothing of the checkout on the path."""
    python = installed["python"]
    where = subprocess.run(
        [python, "-c", "import mtp_plugin, torch; print(mtp_plugin.__file__, torch.__version__)"],
        cwd=tmp_path,
        env=installed["env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(installed["root"] / "mtp-env"), where
    train, valid = write_tiny_corpus(tmp_path / "data")
    run = subprocess.run(
        [
            python,
            "-m",
            "mtp_plugin.train",
            *TINY_MODEL_OVERRIDES,
            f"data.train_prefix={train}",
            f"data.valid_prefix={valid}",
            "training.train_iters=2",
            "training.lr_warmup_iters=1",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith(" finished 2 iterations (256 tokens) in "), run.stdout[
        -2000:
    ]
    assert (tmp_path / "run" / "tensorboard" / "loss_curves.png").is_file()
