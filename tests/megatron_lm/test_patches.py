"""examples/megatron_lm/*.patch against Megatron-LM's own pretrain_gpt.py, when a Megatron-LM checkout is at hand.

MEGATRON_LM_DIR names a git checkout (or bare clone) of NVIDIA/Megatron-LM holding the tags below; without
it these tests skip. Each patch must apply to its tag's pristine pretrain_gpt.py (`git apply --check`), and the
patched core_v0.19.0 script must train through Megatron-LM's own `pretrain()` (on CPU, via
tests/megatron_lm/pretrain_cpu.py) exactly like the unmodified script with native MTP at the same flags:
same lm and mtp_k losses and grad norm at every iteration, plus the plugin's `mtp_k acceptance`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "examples" / "megatron_lm"
TAGS = ["core_v0.16.1", "core_v0.18.2", "core_v0.19.0"]
SCRIPTS = ["pretrain_gpt.py", "model_provider.py", "gpt_builders.py"]
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.megatron_lm,
    pytest.mark.skipif(
        not MEGATRON_LM_DIR,
        reason="set MEGATRON_LM_DIR to a git checkout of NVIDIA/Megatron-LM (with its tags)",
    ),
]


def _checkout(tag: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "archive", tag, *SCRIPTS], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@pytest.mark.parametrize("tag", TAGS)
def test_patch_applies_to_its_tag(tag, tmp_path):
    work = _checkout(tag, tmp_path / tag)
    patch = PATCHES / f"pretrain_gpt_mtp.{tag}.patch"
    subprocess.run(["git", "apply", "--check", str(patch)], cwd=work, check=True)
    subprocess.run(["git", "apply", str(patch)], cwd=work, check=True)
    text = (work / "pretrain_gpt.py").read_text()
    assert "lm_patch.make_forward_step(get_batch)" in text and "lm_patch.add_mtp_args" in text
    compile(text, "pretrain_gpt.py", "exec")


FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--train-iters",
    "4",
    "--lr",
    "0.05",
    "--optimizer",
    "sgd",
    "--seed",
    "4321",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "255",
    "--position-embedding-type",
    "rope",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--moe-token-dispatcher-type",
    "allgather",
    "--mtp-num-layers",
    "2",
    "--mtp-loss-scaling-factor",
    "0.3",
    "--log-interval",
    "1",
    "--eval-iters",
    "1",
    "--eval-interval",
    "1000",
    "--split",
    "100,0,0",
]
FIELD = re.compile(r"\| ([a-z_0-9 ]+): ([-+0-9.E]+) ")


def _train(script_dir: Path) -> list[dict[str, float]]:
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "megatron_lm" / "pretrain_cpu.py"), "pretrain_gpt.py", *FLAGS],
        cwd=script_dir, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if re.search(r"iteration +\d+/ +\d+ \|", line)]
    return [{k.strip(): float(v) for k, v in FIELD.findall(line + " ")} for line in lines]


@pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None,
    reason="needs megatron.training (megatron-core >= 0.17)",
)
def test_patched_core_v019_script_trains_like_native_mtp(tmp_path):
    native_dir = _checkout("core_v0.19.0", tmp_path / "native")
    plugin_dir = _checkout("core_v0.19.0", tmp_path / "plugin")
    subprocess.run(
        ["git", "apply", str(PATCHES / "pretrain_gpt_mtp.core_v0.19.0.patch")], cwd=plugin_dir, check=True
    )
    native, plugin = _train(native_dir), _train(plugin_dir)
    assert len(native) == len(plugin) == 4
    for n, p in zip(native, plugin):
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm"):
            assert p[key] == pytest.approx(n[key], rel=2e-5), (key, n, p)
        assert "mtp_1 acceptance" in p and "mtp_1 acceptance" not in n
        assert 0.0 <= p["mtp_2 acceptance"] <= 1.0
