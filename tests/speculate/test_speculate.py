"""`python -m mtp_plugin.speculate`: exact against plain greedy decoding (CPU, fp32), and its bad inputs.

The model is the app's: a real `python -m mtp_plugin.train` run on the tiny corpus (tests/train_tiny.py) saves
the checkpoint, and the decoder CLI runs as a real process on prompts cut from the corpus's valid split.
Briefly trained, its depths are right often but not always, so the rounds both accept and reject drafts
(the cache rollback is exercised); K = 3 > D = 2 also chains depth 2 on itself. A second, MLA model (the
tiny model with DeepSeek-V3's attention) decodes exactly too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_tiny import REPO, TINY_MLA_OVERRIDES, trained_speculate_model

from mtp_plugin.speculate.__main__ import main

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


trained = pytest.fixture(scope="module")(trained_speculate_model)


@pytest.fixture(scope="module")
def trained_mla(tmp_path_factory):
    return trained_speculate_model(tmp_path_factory, *TINY_MLA_OVERRIDES)


def _decode(trained, *, new_tokens: int, batch_sizes: str) -> list[dict]:
    """The CLI as a real process, K = 3 > D = 2; its JSON results, one per batch size."""
    out = trained["root"] / "decode.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mtp_plugin.speculate",
            "--checkpoint", str(trained["checkpoint"]),
            "--prompts", str(trained["prompts"]),
            "--draft-tokens", "3",
            "--max-new-tokens", str(new_tokens),
            "--batch-sizes", batch_sizes,
            "--json", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acceptance by draft position" in proc.stdout
    return json.loads(out.read_text())["results"]


def test_speculative_output_equals_plain_greedy_token_for_token(trained):
    results = _decode(trained, new_tokens=10, batch_sizes="1,4")
    assert [r["batch_size"] for r in results] == [1, 4]
    for r in results:
        assert r["tokens_identical"] == r["tokens_total"] == 4 * 10, r
        assert r["prompts_identical"] == 4
        assert len(r["acceptance_per_position"]) == 3
        # Both accepted and rejected drafts: every round commits 1..K+1 tokens, and not always K+1.
        assert 0 < r["mean_accepted_length"] < 3, r
        assert 1 <= r["tokens_per_round"] <= 4


def test_mla_model_decodes_exactly_through_the_static_kv_cache(trained_mla):
    # MLA (q/kv LoRA, YaRN): its attention applies RoPE itself at the context's sequence_len_offset and
    # caches its per-head K (no-RoPE + RoPE parts) and V in Megatron's static inference context.
    (r,) = _decode(trained_mla, new_tokens=8, batch_sizes="4")
    assert r["tokens_identical"] == r["tokens_total"] == 4 * 8, r
    assert 0 < r["mean_accepted_length"] < 3, r  # drafts accepted and rejected: the rollback ran


def _fake_checkpoint(root: Path, *, num_depths: int = 2, seq_length: int = 32) -> Path:
    """A save_dir whose run_config.json says what the CLI checks before it builds anything."""
    from dataclasses import asdict

    from train_tiny import tiny_model_config

    from mtp_plugin.config import MTPConfig

    model = tiny_model_config(seq_length=seq_length)
    ckpt = root / "ckpt" / "iter_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    (root / "ckpt" / "latest").write_text("iter_0000001\n")
    config = {
        "model": asdict(model),
        "mtp": asdict(MTPConfig(num_depths=num_depths)),
        "data": {"eod_id": 511},
    }
    (ckpt / "run_config.json").write_text(json.dumps(config))
    return root / "ckpt"


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("k0", "--draft-tokens 0: draft at least 1 token"),
        ("k17", "--draft-tokens 17 is more than this engine drafts (16"),
        ("no-depths", "has no MTP depths (mtp.num_depths=0): plain greedy decoding is the only mode"),
        (
            "too-long",
            "prompt 2 has 30 tokens; with --max-new-tokens 8 that is 38 positions, more than the model's 32",
        ),
        ("no-checkpoint", "--checkpoint"),
        ("outside-vocab", "prompt 1 holds token id 900, outside the model's vocabulary"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, needle, tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path, num_depths=0 if case == "no-depths" else 2)
    prompts = tmp_path / "p.jsonl"
    rows = (
        [[1, 2, 3], list(range(30))] if case == "too-long" else [[900 if case == "outside-vocab" else 5, 6]]
    )
    prompts.write_text("".join(json.dumps({"token_ids": r}) + "\n" for r in rows))
    k = {"k0": "0", "k17": "17"}.get(case, "2")
    argv = ["--checkpoint", str(tmp_path / "nothing" if case == "no-checkpoint" else ckpt)]
    argv += ["--prompts", str(prompts), "--draft-tokens", k, "--max-new-tokens", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
