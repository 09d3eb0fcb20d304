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
import shutil
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


def _checkout(tag: str, into: Path, *paths: str) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", MEGATRON_LM_DIR, "archive", tag, *SCRIPTS, *paths], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _megatron_tree(tag: str, into: Path) -> Path:
    """The tag's own `megatron/` package, with the installed wheel's prebuilt dataset helpers."""
    import megatron.core.datasets as installed

    tree = _checkout(tag, into, "megatron")
    datasets = tree / "megatron" / "core" / "datasets"
    for helper in Path(installed.__path__[0]).glob("helpers_cpp*.so"):
        shutil.copy(helper, datasets / helper.name)
    (datasets / "Makefile").write_text("default:\n\t@true\n")
    return tree


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


def _train(script_dir: Path, tree: Path, *extra: str) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)])}
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "tests" / "megatron_lm" / "pretrain_cpu.py"), "pretrain_gpt.py", *FLAGS,
            *extra,
        ],
        cwd=script_dir, capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if re.search(r"iteration +\d+/ +\d+ \|", line)]
    return [{k.strip(): float(v) for k, v in FIELD.findall(line + " ")} for line in lines]


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Megatron-LM's megatron/ imports triton (the 0.19.2 leg has it)",
)
@pytest.mark.parametrize("tag", TAGS)
def test_patched_script_trains_like_native_mtp(tag, tmp_path):
    tree = _megatron_tree(tag, tmp_path / "tree")
    native_dir = _checkout(tag, tmp_path / "native")
    plugin_dir = _checkout(tag, tmp_path / "plugin")
    subprocess.run(
        ["git", "apply", str(PATCHES / f"pretrain_gpt_mtp.{tag}.patch")], cwd=plugin_dir, check=True
    )
    native, plugin = _train(native_dir, tree), _train(plugin_dir, tree)
    assert len(native) == len(plugin) == 4
    for n, p in zip(native, plugin):
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm"):
            assert p[key] == pytest.approx(n[key], rel=2e-5), (key, n, p)
        assert not any("acceptance" in key for key in n)
        # core_v0.16 - v0.18's training_log leaves out a metric whose value is 0, so a step may lack one.
        assert all(0.0 <= p.get(f"mtp_{k} acceptance", 0.0) <= 1.0 for k in (1, 2))
    assert any("mtp_1 acceptance" in p or "mtp_2 acceptance" in p for p in plugin)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Megatron-LM's megatron/ imports triton (the 0.19.2 leg has it)",
)
def test_unmodified_megatron_lm_averages_the_first_two_iterations_after_a_resume(tmp_path):
    """Issue 21 item 7: after a resume the drop-in logs the second iteration's losses as the mean of the
    first two. So does Megatron-LM without the plugin: its training_log logs a process's first iteration
    without resetting the accumulators (`should_reset = not is_first_iteration`, core_v0.16.0 on), so the
    next log line averages both. The unmodified core_v0.19.0 script, native MTP, resumed from iteration 2."""
    tag = "core_v0.19.0"
    tree = _megatron_tree(tag, tmp_path / "tree")
    script_dir = _checkout(tag, tmp_path / "native")
    ckpt = tmp_path / "ckpt"
    # No dropout: on CPU the RNG states cannot be restored (--no-load-rng: CUDA's), and need not be.
    exact = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    whole = _train(script_dir, tree, *exact)
    # The legacy per-rank torch format: torch_dist's writer starts a multiprocessing Manager, which this
    # runner's `__main__` (runpy) cannot spawn.
    saving = [*exact, "--save", str(ckpt), "--save-interval", "2", "--ckpt-format", "torch"]
    first = _train(script_dir, tree, *saving, "--exit-interval", "2")
    resumed = _train(script_dir, tree, *saving, "--load", str(ckpt), "--no-load-rng")
    assert len(whole) == 4 and len(first) == 2 and len(resumed) == 2
    keys = ("lm loss", "mtp_1 loss", "mtp_2 loss")
    for key in keys:
        assert first[1][key] == pytest.approx(whole[1][key], rel=1e-6), key
        assert resumed[0][key] == pytest.approx(whole[2][key], rel=1e-6), key  # iteration 3: itself
        # Iteration 4: the mean of iterations 3 and 4, as the uninterrupted run's iteration 2 is of 1 and 2.
        assert resumed[1][key] == pytest.approx((whole[2][key] + whole[3][key]) / 2, rel=1e-6), key
        assert resumed[1][key] != pytest.approx(whole[3][key], rel=1e-6), key


def _model_state(save_dir: Path) -> dict:
    """The model tensors of the last checkpoint in a --ckpt-format torch save_dir (one rank)."""
    import torch

    iteration = (save_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    path = save_dir / f"iter_{int(iteration):07d}" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Megatron-LM's megatron/ imports triton (the 0.19.2 leg has it)",
)
def test_frozen_trunk_through_pretrain_moves_only_the_depths(tmp_path):
    """Issue 23's refresh through Megatron-LM's own pretrain(): the patched core_v0.19.0 script trains
    jointly and saves; a second run with `--mtp-plugin-trunk-gradients frozen --pretrained-checkpoint`
    (Megatron-LM's own finetune path: weights only, iteration 0, fresh optimizer) trains two iterations.
    Every trunk, embedding and head tensor it saves is bit-identical to the pretrained one; every depth
    tensor moved (weight decay 0.01 on: what has no gradient is not in the optimizer)."""
    import torch

    tag = "core_v0.19.0"
    tree = _megatron_tree(tag, tmp_path / "tree")
    script_dir = _checkout(tag, tmp_path / "plugin")
    subprocess.run(
        ["git", "apply", str(PATCHES / f"pretrain_gpt_mtp.{tag}.patch")], cwd=script_dir, check=True
    )
    pretrained, refreshed = tmp_path / "pretrained", tmp_path / "refreshed"
    # The legacy torch format: torch_dist's writer starts a multiprocessing Manager that runpy cannot spawn.
    saving = ["--train-iters", "2", "--save-interval", "2", "--ckpt-format", "torch"]
    joint = _train(script_dir, tree, *saving, "--save", str(pretrained))
    frozen = _train(
        script_dir,
        tree,
        *saving,
        "--save",
        str(refreshed),
        "--pretrained-checkpoint",
        str(pretrained),
        "--mtp-plugin-trunk-gradients",
        "frozen",
    )
    assert len(joint) == len(frozen) == 2
    assert all(p["mtp_1 loss"] > 0 and p["mtp_2 loss"] > 0 for p in frozen)
    before, after = _model_state(pretrained), _model_state(refreshed)
    assert before.keys() == after.keys()
    depths = [k for k in before if k.startswith("mtp_stack.")]
    trunk = [k for k in before if not k.startswith("mtp_stack.")]
    assert depths and any(k.startswith("decoder.") for k in trunk)
    assert "embedding.word_embeddings.weight" in trunk  # tied: the head's weight too
    assert [k for k in trunk if not torch.equal(before[k], after[k])] == []
    assert [k for k in depths if torch.equal(before[k], after[k])] == []
