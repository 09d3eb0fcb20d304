"""A built wheel carries the Hydra configs: `python -m mtp_plugin.train` composes a config from an
installed (non-editable) copy, run outside the checkout, and the build prints no licence warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Build from a copy of the sources, so nothing (build/, *.egg-info) is left in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mtp_plugin", src / "mtp_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = out.glob("mtp_plugin-*.whl")
    return whl, build.stdout + build.stderr


def test_wheel_ships_every_config_and_the_licence(wheel):
    whl, log = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = {
        "mtp_plugin/hydra_configs/" + str(p.relative_to(REPO / "mtp_plugin" / "hydra_configs"))
        for p in (REPO / "mtp_plugin" / "hydra_configs").rglob("*.yaml")
    }
    assert len(shipped) >= 15 and shipped <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert (
        "License-Expression: Apache-2.0"
        in zipfile.ZipFile(whl).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    )
    assert "project.license` as a TOML table is deprecated" not in log


def test_installed_wheel_composes_a_config_outside_the_checkout(wheel, tmp_path):
    whl, _ = wheel
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(whl),
        ],
        check=True,
        timeout=120,
    )
    # PYTHONPATH comes before the editable install's finder, so this imports the installed copy.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import mtp_plugin; print(mtp_plugin.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_plugin.train",
            "--cfg",
            "job",
            "experiment=toy_demo",
            "training.train_iters=17",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train_iters: 17" in run.stdout and "num_depths: 2" in run.stdout, run.stdout
    # The preset's group options (mtp/deepseek_v3_scaled, training/toy_demo) ship too; the summary line.
    assert run.stdout.startswith("# MTP D = 2 (w_k = 1/D), λ 0.3, then 0.1 from "), run.stdout[:300]
    assert not (tmp_path / "outputs").exists()  # --cfg prints the config and runs nothing
