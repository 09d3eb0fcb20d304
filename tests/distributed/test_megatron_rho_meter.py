"""RhoMeter (mtp_plugin.megatron.meter) over real Megatron pipeline / expert parallel groups (CPU, gloo).

(a) Σ over ranks of F and B at pp=2 and pp=2 x ep=2 equals the single-process count of the same global
batch; (b) a router forced to send every token to the experts of one expert-parallel rank moves the
expert FLOPs onto that rank; (c) per-stage F equals a hand sum of the tiny model's matmuls; recomputed
layers cost one more forward; what is not trained (a frozen trunk, depths under λ ≡ 0) its forward only.
"""

import math
import zlib

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

NUM_DEPTHS = 2
GLOBAL_MICROBATCHES = 2
MICRO_BATCH = 2
NUM_LAYERS = 4
H, HEADS, FFN, V, S, EXPERTS, TOPK = 32, 4, 64, 96, 16, 4, 2  # TinyGPT defaults
SHARED = 48  # shared-expert width of the "moe_shared" case


def _init_by_global_name(model, to_global):
    names = {
        local: glob for glob, local in to_global(model, {n: n for n, _ in model.named_parameters()}).items()
    }
    with torch.no_grad():
        for local, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(names[local].encode()))
            if local.endswith("norm.weight") or "layernorm" in local:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def _force_route_to_first_experts(model):
    """Test-only: every router's top-2 becomes experts {0, 1} (both on expert-parallel rank 0)."""
    from megatron.core.transformer.moe.router import TopKRouter

    def hook(module, args, output):
        probs, routing_map = output
        forced = torch.zeros_like(routing_map)
        forced[:, :TOPK] = True
        return probs * forced + 0.5 * forced, forced  # keeps the router in the graph

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TopKRouter)]


def _cpu_recompute_shim():
    """Test-only, in this worker process: what Megatron's recompute needs on CPU.

    Its checkpoint saves the CUDA RNG state (dropout is 0 here, the CPU state Megatron also saves is
    enough), and the recomputed forward runs inside autograd, where the cuda->cpu TorchFunctionMode of
    megatron_cpu does not reach the default causal mask (built with device="cuda").
    """
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _meter_worker(cases):
    """Run each case (dict: num_experts, recompute overrides, force_step) one training step per phase."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_cpu import (
        TinyGPT,
        make_microbatches,
        plugin_forward_backward,
        tiny_transformer_config,
        to_global_names,
    )

    from mtp_plugin.config import ModelConfig, MTPConfig, ParallelConfig
    from mtp_plugin.megatron import MTPGPTModel, MTPMetrics, plan_pipeline
    from mtp_plugin.megatron.meter import RhoMeter

    _cpu_recompute_shim()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out = []
    for case in cases:
        num_experts = case.get("num_experts")
        shape = TinyGPT(
            num_layers=NUM_LAYERS,
            num_moe_experts=num_experts,
            mtp_num_layers=NUM_DEPTHS,
            share_embeddings_and_output_weights=False,
            moe_token_dispatcher_type="alltoall",
        )
        plan = plan_pipeline(num_layers=NUM_LAYERS, num_depths=NUM_DEPTHS, pipeline_size=pp)
        stage = plan.stages[pp_rank]
        config = tiny_transformer_config(shape, **case.get("config", {}))
        model = MTPGPTModel(
            config,
            get_gpt_layer_local_spec(
                num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
            ),
            shape.vocab_size,
            shape.seq_length,
            mtp_stage=plan.mtp_stage,
            pre_process="E" in stage,
            post_process="L" in stage,
            share_embeddings_and_output_weights=False,
            **case.get("model", {}),
        )
        _init_by_global_name(model, to_global_names)
        model_cfg = ModelConfig(
            num_layers=NUM_LAYERS,
            hidden_size=H,
            num_attention_heads=HEADS,
            ffn_hidden_size=FFN,
            seq_length=S,
            vocab_size=V,
            num_experts=num_experts or 0,
            first_dense_layers=0,
        )
        parallel_cfg = ParallelConfig(
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            sequence_parallel=config.sequence_parallel,
        )
        meter = RhoMeter(model_cfg, MTPConfig(num_depths=NUM_DEPTHS), parallel_cfg, peak_tflops=1.0)
        meter.attach([model])
        num_mb = GLOBAL_MICROBATCHES // dp
        batches = make_microbatches(shape, GLOBAL_MICROBATCHES, MICRO_BATCH, seed=11, mask_tail=1)
        batches = batches[dp_rank * num_mb : (dp_rank + 1) * num_mb]
        phases = ["normal"] + (["forced"] if case.get("force_step") else [])
        record = {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": pp_rank,
            "stage": stage,
            "ep_rank": ps.get_expert_model_parallel_rank(),
        }
        for phase in phases:
            handles = _force_route_to_first_experts(model) if phase == "forced" else []
            metrics = MTPMetrics(NUM_DEPTHS)
            meter.reset()
            plugin_forward_backward(model, batches, lam=case.get("lam", 0.3), metrics=metrics)
            meter.end_step()
            for handle in handles:
                handle.remove()
            record[phase] = {
                "local": meter.local_flops(),
                "experts": meter.expert_tokens(),
                "fields": meter.reduce(metrics=metrics, elapsed_s=2.0),
                "metrics": metrics.as_tensor(),
            }
        record["n_active"] = meter.n_active
        meter.detach()
        out.append(record)
    return out


REFERENCE_CASES = [
    {"name": "dense"},
    {"name": "moe", "num_experts": EXPERTS},
    {
        "name": "moe_shared",
        "num_experts": EXPERTS,
        "config": dict(moe_shared_expert_intermediate_size=SHARED),
    },
    {
        "name": "full_recompute",
        "config": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    },
    {
        "name": "core_attn_recompute",
        "config": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    },
    {"name": "frozen_trunk", "model": dict(trunk_gradients="frozen")},
    {"name": "untrained_depths", "model": dict(train_depths=False), "lam": 0.0},  # λ ≡ 0
    {"name": "chunked_heads", "model": dict(loss_chunk_tokens=24)},
]


@pytest.fixture(scope="module")
def reference():
    results = run_distributed(_meter_worker, 1, REFERENCE_CASES, parallel=dict(), timeout=240)[0]
    return {case["name"]: r for case, r in zip(REFERENCE_CASES, results)}


# --- the tiny model's matmuls, by hand (non-gated MLP, MHA, causal half) -----------------------------

TOKENS = GLOBAL_MICROBATCHES * MICRO_BATCH * S  # tokens per step over the global batch
ATTN_PROJ = 2 * (H * 3 * H + H * H)  # per token: QKV h -> 3h, output h -> h
SCORES = 2 * S * HEADS * (2 * (H // HEADS)) // 2  # per query: QK^T + AV over S keys, causal half
DENSE_MLP = 2 * (2 * H * FFN)  # fc1 h -> ffn, fc2 ffn -> h
HEAD = 2 * H * V
MTP_PROJ = 2 * 2 * H * H


def _layer(moe: bool) -> int:
    mlp = 2 * H * EXPERTS + TOPK * DENSE_MLP if moe else DENSE_MLP
    return ATTN_PROJ + SCORES + mlp


def _stage_flops(num_layers: int, *, last: bool, moe: bool = False) -> int:
    per_token = num_layers * _layer(moe)
    if last:
        per_token += HEAD + NUM_DEPTHS * (MTP_PROJ + _layer(moe) + HEAD)
    return 3 * per_token * TOKENS


def _assert_sums_match(reference_record, records, phase="normal", same_weights=True):
    ref = reference_record["normal"]
    assert sum(r[phase]["local"]["total"] for r in records) == pytest.approx(ref["local"]["total"], rel=1e-9)
    for r in records:
        fields = r[phase]["fields"]
        assert fields["flops"] == pytest.approx(ref["fields"]["flops"], rel=1e-9)
        assert fields["flops 6NT"] == pytest.approx(ref["fields"]["flops 6NT"], rel=1e-9)
        assert fields["bits ceiling"] == ref["fields"]["bits ceiling"]  # counts x log2 V: exact
        for k in range(1, NUM_DEPTHS + 1):
            assert fields[f"bits mtp_{k}"] == ref["fields"][f"bits mtp_{k}"]
            assert fields[f"targets mtp_{k}"] == ref["fields"][f"targets mtp_{k}"]
        if phase != "normal" or not same_weights:
            continue  # the model's outputs differ (forced routing, TP shards), not what was scored or run
        # Loss sums: same weights and tokens, different reduction order across stages.
        assert fields["bits effective"] == pytest.approx(ref["fields"]["bits effective"], rel=1e-5)


def test_single_process_matches_hand_sum(reference):
    dense, moe = reference["dense"]["normal"], reference["moe"]["normal"]
    assert dense["local"]["total"] == _stage_flops(NUM_LAYERS, last=True)
    assert moe["local"]["total"] == pytest.approx(_stage_flops(NUM_LAYERS, last=True, moe=True), rel=1e-12)
    fields = dense["fields"]
    metrics = dense["metrics"]
    targets = metrics[1].item() + metrics[2 + NUM_DEPTHS : 2 + 2 * NUM_DEPTHS].sum().item()
    assert fields["bits ceiling"] == pytest.approx(targets * math.log2(V), rel=1e-12)
    assert fields["bits main"] == metrics[1].item() * math.log2(V)
    loss_nats = metrics[0].item() + metrics[2 : 2 + NUM_DEPTHS].sum().item()
    assert fields["bits effective"] == pytest.approx(loss_nats / math.log(2), rel=1e-12)
    assert fields["rho_ceiling bits/GFLOP"] == pytest.approx(fields["bits ceiling"] / fields["flops"] * 1e9)
    n_active = NUM_LAYERS * (ATTN_PROJ + DENSE_MLP) / 2 + H * V
    assert reference["dense"]["n_active"] == n_active
    assert fields["flops 6NT"] == 6 * n_active * TOKENS
    assert fields["TFLOP/s/GPU"] == pytest.approx(fields["flops"] / 2.0 / 1e12)
    assert fields["MFU"] == pytest.approx(fields["TFLOP/s/GPU"])  # peak_tflops=1.0
    # Every routed token was counted on the (only) rank: top-k per token per MoE layer.
    routed = sum(sum(per.values()) for per in moe["experts"].values())
    assert routed == TOPK * TOKENS * (NUM_LAYERS + NUM_DEPTHS)


def test_shared_experts_counted_on_every_token(reference):
    moe, shared = reference["moe"]["normal"]["local"], reference["moe_shared"]["normal"]["local"]
    per_layer = 3 * 2 * (2 * H * SHARED) * TOKENS
    assert shared["shared_experts"] == (NUM_LAYERS + NUM_DEPTHS) * per_layer
    assert shared["total"] == pytest.approx(moe["total"] + shared["shared_experts"], rel=1e-12)


def test_recompute_adds_one_forward(reference):
    dense = reference["dense"]["normal"]["local"]
    full = reference["full_recompute"]["normal"]["local"]
    selective = reference["core_attn_recompute"]["normal"]["local"]
    # Full recompute re-runs the trunk layers (MTP blocks are outside Megatron's TransformerBlock).
    trunk_fraction = NUM_LAYERS / (NUM_LAYERS + NUM_DEPTHS)
    for key in ("attention_projections", "attention_scores", "mlp"):
        assert full[key] == pytest.approx(dense[key] * (1 + trunk_fraction / 3), rel=1e-12), key
    for key in ("head", "mtp_heads", "mtp_projections"):
        assert full[key] == dense[key], key
    # Selective core_attn recomputes the scores of every layer (trunk and MTP blocks), nothing else.
    assert selective["attention_scores"] == pytest.approx(dense["attention_scores"] * 4 / 3, rel=1e-12)
    assert selective["attention_projections"] == dense["attention_projections"]


def test_untrained_parts_cost_their_forward_only(reference):
    dense = reference["dense"]["normal"]["local"]
    frozen = reference["frozen_trunk"]["normal"]["local"]
    untrained = reference["untrained_depths"]["normal"]["local"]
    # Frozen trunk: its layers and the main head run forward only (x1), the depths' blocks forward +
    # backward (x3), their heads forward + input gradient (x2: the head weight enters detached).
    per_token = NUM_LAYERS * _layer(False) + HEAD + NUM_DEPTHS * (3 * (MTP_PROJ + _layer(False)) + 2 * HEAD)
    assert frozen["total"] == per_token * TOKENS
    assert frozen["head"] == dense["head"] / 3 and frozen["mtp_heads"] == dense["mtp_heads"] * 2 / 3
    assert frozen["mtp_projections"] == dense["mtp_projections"]
    # λ ≡ 0: the depths are scored for the log only (forward), the trunk and main head train (x3).
    per_token = 3 * (NUM_LAYERS * _layer(False) + HEAD) + NUM_DEPTHS * (MTP_PROJ + _layer(False) + HEAD)
    assert untrained["total"] == per_token * TOKENS
    assert untrained["mtp_heads"] == dense["mtp_heads"] / 3 and untrained["head"] == dense["head"]
    # 6NT stays the joint step's estimate (main-head tokens of the training forwards), for comparison.
    for name in ("frozen_trunk", "untrained_depths"):
        fields = reference[name]["normal"]["fields"]
        assert fields["flops 6NT"] == reference["dense"]["normal"]["fields"]["flops 6NT"], name
        assert fields["flops"] == reference[name]["normal"]["local"]["total"], name


def test_chunked_loss_path_counts_the_main_head(reference):
    # loss_chunk_tokens > 0 scores the main head without calling output_layer: the same FLOPs and T.
    chunked = reference["chunked_heads"]["normal"]
    assert chunked["local"] == reference["dense"]["normal"]["local"]
    assert chunked["fields"]["flops 6NT"] == reference["dense"]["normal"]["fields"]["flops 6NT"]


def test_pp2_sums_match_single_process(reference):
    records = run_distributed(
        _meter_worker, 2, [{"name": "dense"}], parallel=dict(pipeline_model_parallel_size=2), timeout=240
    )
    records = [r[0] for r in records]
    _assert_sums_match(reference["dense"], records)
    # (c) per-stage totals: stage 0 = two trunk layers; stage 1 = two layers, the depths and the heads.
    by_stage = {r["pp_rank"]: r["normal"]["local"] for r in records}
    assert by_stage[0]["total"] == _stage_flops(2, last=False)
    assert by_stage[1]["total"] == _stage_flops(2, last=True)
    assert by_stage[0]["head"] == by_stage[0]["mtp_heads"] == 0


def test_tp2_sums_match_single_process(reference):
    # Sequence parallelism needs Apex/TE norms (Megatron's torch norm refuses it), so not on CPU.
    records = run_distributed(
        _meter_worker,
        2,
        [{"name": "dense"}],
        parallel=dict(tensor_model_parallel_size=2),
        timeout=240,
    )
    records = [r[0] for r in records]
    # The test's init draws each TP shard from its name, so the weights (not the counts) differ at TP=2.
    _assert_sums_match(reference["dense"], records, same_weights=False)
    # Each tensor-parallel rank ran half of every matmul.
    for r in records:
        assert r["normal"]["local"]["total"] == pytest.approx(
            reference["dense"]["normal"]["local"]["total"] / 2
        )


def test_pp2_ep2_sums_and_forced_routing(reference):
    records = run_distributed(
        _meter_worker,
        4,
        [{"name": "moe", "num_experts": EXPERTS, "force_step": True}],
        parallel=dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2),
        timeout=240,
    )
    records = [r[0] for r in records]
    _assert_sums_match(reference["moe"], records)
    # (a) every routed token is counted once over the expert-parallel ranks.
    routed = sum(sum(per.values()) for r in records for per in r["normal"]["experts"].values())
    assert routed == TOPK * TOKENS * (NUM_LAYERS + NUM_DEPTHS)

    # (b) forced routing: every token's top-2 is {expert 0, expert 1}, both held by ep rank 0.
    _assert_sums_match(reference["moe"], records, phase="forced")  # dropless: same total
    expert_flops = {}
    for r in records:
        key = (r["pp_rank"], r["ep_rank"])
        expert_flops[key] = r["forced"]["local"]["experts"]
        for per in r["forced"]["experts"].values():
            if r["ep_rank"] == 0:
                assert set(per) == {0, 1} and per[0] == per[1] > 0
            else:
                assert set(per) == {2, 3} and per[2] == per[3] == 0
    per_token_experts = 3 * TOPK * DENSE_MLP * TOKENS  # forward + backward, one MoE layer
    for pp_rank, moe_layers in ((0, 2), (1, 2 + NUM_DEPTHS)):
        assert expert_flops[(pp_rank, 1)] == 0
        assert expert_flops[(pp_rank, 0)] == moe_layers * per_token_experts
    # Before forcing, both expert-parallel ranks did expert work.
    assert all(r["normal"]["local"]["experts"] > 0 for r in records)
