"""The training loop under tensor, sequence, expert and pipeline parallelism together (issue 17), and
per-document attention through MTPGPTModel. One 4-process launch and one 1-process launch (process
start-up dominates the time) check:

- exact resume, with TP- and EP-sharded MTP parameters saved and reloaded under the same layout:
  `tp2-sp-ep2` (tp 2 with sequence parallel x dp 2, the MoE experts of trunk and MTP depths split over
  ep 2, uneven depth weights, per-document attention with EOD loss masking), `pp2-tp2-sp-tied`
  (pp 2 x tp 2 with sequence parallel, both MTP depths on a stage of their own with the loss, a tied
  head) and `pp2-ep2` (pp 2 x ep 2, the first stage without experts, so with an empty expert
  optimizer): a run stopped and saved at iteration 2 and resumed equals the uninterrupted run exactly;
- the same checkpoint resharded into one process continues with the parallel run's losses (iterations
  3 and 4): sequence parallel with MoE and with pp, the tied head on pp 2 and the MTP stage compute what
  the single-process model does, and `MTPMetrics.reduce` over dp 2 is the token-weighted mean of dp 1;
- per-document attention: with Megatron's reset attention mask the losses of a document do not depend
  on the document before it (main head and every MTP depth), and depth-k targets never cross an EOD.

Megatron's distributed optimizer needs CUDA tensors; its resume is tests/gpu/test_gpu_train_app.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import run_trainer, tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow]

LOSS_KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "mtp_1 acceptance", "mtp_2 acceptance", "grad norm")
ITERS, SAVED_AT = 4, 2


def _experiment(name: str, train_prefix: str, valid_prefix: str, *, single: bool, **training):
    from mtp_plugin.config import ParallelConfig

    cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=ITERS, **training)
    cfg.model = dataclasses.replace(cfg.model, moe_token_dispatcher_type="allgather")
    sp = dict(tensor_model_parallel_size=2, sequence_parallel=True)
    if name == "pp2-ep2":  # dp 2, expert dp 1; stage 0 holds the dense layer only, so no expert
        # parameter: its expert optimizer is empty (Megatron aligns param groups across ranks) and has no step
        cfg.parallel = ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    elif name == "pp2-tp2-sp-tied":  # both MTP depths on stage 1 with the head and loss, no trunk layer there
        cfg.parallel = ParallelConfig(**sp, pipeline_model_parallel_size=2, pipeline_layout="Ett|mmL")
        cfg.model = dataclasses.replace(cfg.model, untie_embeddings_and_output_weights=False)
    else:  # dp 2; the experts of trunk and MTP depths split over tp 2 (and over ep 2 for tp2-sp-ep2)
        ep = 2 if name == "tp2-sp-ep2" else 1
        cfg.parallel = ParallelConfig(**sp, expert_model_parallel_size=ep)
        cfg.mtp = dataclasses.replace(cfg.mtp, depth_weights=[0.75, 0.25])
        cfg.data = dataclasses.replace(cfg.data, reset_attention_mask=True, eod_mask_loss=True)
    if single:
        cfg.parallel = ParallelConfig()
    return cfg


# Resharded into one process: the first two; tp2-sp-ep2 and pp2-ep2 resume under their own layout only.
CASES = ("tp2-sp", "pp2-tp2-sp-tied", "tp2-sp-ep2", "pp2-ep2")
RESHARDED = CASES[:2]


def _parallel_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    out = {}
    for name in CASES:
        ckpt, after = str(Path(tmp) / name), str(Path(tmp) / f"{name}-after")
        full = run_trainer(_experiment(name, train_prefix, valid_prefix, single=False))
        first = run_trainer(
            _experiment(name, train_prefix, valid_prefix, single=False, save_dir=ckpt), stop_at=SAVED_AT
        )
        # Resumed from `ckpt` (its iteration 2 stays the newest there for the single-process run).
        second = run_trainer(
            _experiment(name, train_prefix, valid_prefix, single=False, load_dir=ckpt, save_dir=after)
        )
        out[name] = {"full": full, "first": first, "second": second}
    return out


def _single_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    from megatron.core import parallel_state as ps

    out = {"documents": _per_document_losses()}
    ps.destroy_model_parallel()  # the Trainer sets up its own groups
    for name in RESHARDED:
        cfg = _experiment(name, train_prefix, valid_prefix, single=True, load_dir=str(Path(tmp) / name))
        out[name] = run_trainer(cfg)
    from mtp_plugin.train.loop import ResumeMismatchError

    cfg = _experiment(
        "tp2-sp-ep2", train_prefix, valid_prefix, single=True, load_dir=str(Path(tmp) / "tp2-sp-ep2")
    )
    try:
        run_trainer(cfg)
    except ResumeMismatchError as err:
        out["ep2 to ep1"] = str(err)
    return out


# ------------------------------------------------------------------ per-document attention

SEQ, EOD, DOC_START = 16, 95, 7  # [document A: 0..5] [EOD: 6] [document B: 7..15]


def _per_document_losses() -> dict:
    """MTPGPTModel on [A, EOD, B] and [A', EOD, B] with Megatron's per-document mask, scoring B only."""
    from megatron_cpu import TinyGPT, build_tiny_plugin_gpt, seed_megatron

    seed_megatron(5)
    model = build_tiny_plugin_gpt(TinyGPT(num_layers=2, mtp_num_layers=2, seq_length=SEQ, vocab_size=96))
    model.eod_id = EOD  # what build_mtp_gpt_model sets with mtp.mask_across_eod
    gen = torch.Generator().manual_seed(3)
    doc_b = torch.randint(0, EOD, (SEQ - DOC_START + 1,), generator=gen)  # B and the last label
    outputs = []
    for _ in range(2):  # two different first documents
        doc_a = torch.randint(0, EOD, (DOC_START - 1,), generator=gen)
        window = torch.cat([doc_a, torch.tensor([EOD]), doc_b]).unsqueeze(0)
        tokens, labels = window[:, :-1], window[:, 1:]
        # GPTDataset's reset_attention_mask: causal within a document, the EOD closing its document.
        doc_of = torch.cumsum((tokens == EOD).long(), dim=1) - (tokens == EOD).long()
        same_doc = doc_of.unsqueeze(2) == doc_of.unsqueeze(1)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        attention_mask = ~(same_doc & causal).unsqueeze(1)  # True = masked, [b, 1, s, s]
        loss_mask = torch.zeros(1, SEQ)
        loss_mask[:, DOC_START:] = 1.0
        position_ids = torch.arange(SEQ).unsqueeze(0)
        with torch.no_grad():
            main_bs, sums_d, counts_d2 = model(
                tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask
            )
        outputs.append({"main": main_bs, "sums": sums_d, "counts": counts_d2[:, 0]})
    return outputs


# ------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_resume")
    train, valid = write_tiny_corpus(tmp / "data")
    # The last rank logs (the last pipeline stage).
    parallel = run_distributed(_parallel_worker, 4, str(tmp), train, valid, timeout=420)[-1]
    (single,) = run_distributed(_single_worker, 1, str(tmp), train, valid, parallel=dict(), timeout=240)
    return parallel, single


@pytest.mark.parametrize("name", CASES)
def test_parallel_run_resumes_exactly(runs, name):
    parallel, _ = runs
    full, first, second = (parallel[name][k] for k in ("full", "first", "second"))
    assert second["start"] == SAVED_AT and "RNG states not loaded" not in " ".join(second["lines"])
    want = full["history"]
    got = first["history"] + second["history"]
    assert [h["iteration"] for h in got] == [h["iteration"] for h in want] == list(range(1, ITERS + 1))
    for g, w in zip(got, want, strict=True):
        for key in (*LOSS_KEYS, "mtp lambda", "learning rate"):
            assert g[key] == w[key], f"{name} iteration {w['iteration']}: {key} {g[key]!r} != {w[key]!r}"
    assert full["history"][-1]["lm loss"] < full["history"][0]["lm loss"]  # it trains


@pytest.mark.parametrize("name", RESHARDED)
def test_parallel_checkpoint_continues_in_one_process(runs, name):
    """One process continues the parallel run from its iteration-2 checkpoint (resharded, RNG skipped):
    the same model, so the same losses and grad norms, up to the order of the tensor-parallel and dp sums."""
    parallel, single = runs
    full, resumed = parallel[name]["full"], single[name]
    assert resumed["start"] == SAVED_AT
    assert any("parallel layout changed" in line for line in resumed["lines"])
    want_after = {int(h["iteration"]): h for h in full["history"] if h["iteration"] > SAVED_AT}
    got_after = {int(h["iteration"]): h for h in resumed["history"]}
    assert sorted(got_after) == sorted(want_after) == [3, 4]
    for it, values in got_after.items():
        for key in LOSS_KEYS:
            torch.testing.assert_close(
                values[key], want_after[it][key], rtol=2e-5, atol=1e-6, msg=f"{it} {key}"
            )
    assert full["history"][-1]["lm loss"] < full["history"][0]["lm loss"]  # it trains


def test_a_document_is_scored_alone_under_per_document_attention(runs):
    """Before, only `depth_targets` was tested: nothing showed that MTPGPTModel passes the mask to the
    MTP depths' attention or that its depth counts drop targets across the EOD."""
    first, second = runs[1]["documents"]
    # The first documents differ, and so do their losses...
    assert not torch.allclose(first["main"][:, : DOC_START - 1], second["main"][:, : DOC_START - 1])
    # ... but document B's main loss and every depth's loss over B do not depend on them.
    torch.testing.assert_close(
        first["main"][:, DOC_START:], second["main"][:, DOC_START:], rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(first["sums"], second["sums"], rtol=1e-6, atol=1e-6)
    # Depth k scores position i of B only while t_(i+1+k) is in the window: 9 - k targets, none across the EOD.
    doc_len = SEQ - DOC_START
    assert first["counts"].tolist() == [doc_len - 1, doc_len - 2]
