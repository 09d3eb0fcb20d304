"""Speculative decoding on one CUDA device: exact in fp32, and in bf16 how many tokens agree.

The same app checkpoint and CLI as tests/speculate/test_speculate.py (the tiny corpus, D = 2, K = 3), trained
and decoded on the GPU. fp32: identical to plain greedy token for token. bf16: the verify forward scores K + 1
tokens in one matmul where plain greedy scores one, so a near-tie can round the other way; from that token
on a row's continuation differs. The test prints the count and requires the first generated token of every
prompt (no verify forward before it) and at least half of all tokens to agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_tiny import REPO, trained_speculate_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.megatron,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


trained = pytest.fixture(scope="module")(trained_speculate_model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_decoding_on_gpu(trained, dtype, tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, "-m", "mtp_plugin.speculate", "--checkpoint", str(trained["checkpoint"])]
    cmd += ["--prompts", str(trained["prompts"]), "--draft-tokens", "3", "--max-new-tokens", "16"]
    cmd += ["--batch-sizes", "1,4", "--dtype", dtype, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    for r in json.loads(out.read_text())["results"]:
        if dtype == "float32":
            assert r["tokens_identical"] == r["tokens_total"], r
        else:
            assert r["tokens_identical"] >= r["tokens_total"] // 2, r
