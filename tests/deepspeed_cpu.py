"""DeepSpeed on CPU over gloo for tests: the one shim, tiny configs and a pipeline training worker.

The shim: DeepSpeed's first `init_distributed` JIT-compiles a shared-memory all-reduce op (45-100 s on two
cores) that only inference all-reduce uses; `build_shm_op` is replaced by a no-op so that DeepSpeed falls
back to torch.distributed (gloo). `import deepspeed.comm.torch as m` would bind the torch package itself
(deepspeed.comm re-exports a `torch` name), hence importlib.
"""

from __future__ import annotations

import importlib
import os

import torch

from mtp_plugin.config import ModelConfig, MTPConfig


def init_deepspeed_cpu() -> None:
    """Call in a worker whose torch.distributed (gloo) is initialised, before anything builds a model."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed("gloo")


def tiny_moe_model(**overrides) -> ModelConfig:
    """4 layers (1 dense + 3 MoE of 4 experts, top-2), hidden 32, vocabulary 96: every stage of 2 holds MoE."""
    fields = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        seq_length=16,
        vocab_size=96,
        make_vocab_size_divisible_by=32,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_size=32,
        first_dense_layers=1,
        moe_aux_loss_coeff=0.01,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def pattern_samples(num_samples: int, seq_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[num_samples, seq_length + 1] windows of t_(i+1) = t_i + step (mod V), a random start and step per
    window: every depth's target is predictable from the window so far, so every depth's loss can fall."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (num_samples, 1), generator=gen)
    step = torch.randint(1, 4, (num_samples, 1), generator=gen)
    return (start + step * torch.arange(seq_length + 1)) % vocab_size


def pipe_batches(
    samples: torch.Tensor, *, micro_batch_size: int, dp_rank: int, dp_size: int, first_step: int = 0
):
    """DeepSpeed pipeline micro-batches ((tokens,), (labels, loss_mask)); this rank's n-th micro-batch is window
    block n * dp + dp_rank, so data-parallel ranks read disjoint blocks and one rank reads what dp=1 would."""
    num = samples.shape[0] // micro_batch_size
    index = first_step * dp_size + dp_rank
    while True:
        i = (index % num) * micro_batch_size
        window = samples[i : i + micro_batch_size]
        yield (
            (window[:, :-1].contiguous(),),
            (
                window[:, 1:].contiguous(),
                torch.ones(window.shape[0], window.shape[1] - 1),
            ),
        )
        index += dp_size


def train_pipeline(
    model: ModelConfig,
    mtp: MTPConfig,
    *,
    num_stages: int,
    ep_size: int = 1,
    steps: int = 3,
    micro_batch_size: int = 2,
    global_batch_size: int = 4,
    lr: float = 1e-3,
    lam: float = 0.3,
    chunk_tokens: int = 8,
) -> dict:
    """Train `steps` DeepSpeed pipeline steps on this rank; returns losses, per-depth metrics, tied weights."""
    from mtp_plugin.config import ExperimentConfig, ParallelConfig, TrainingConfig
    from mtp_plugin.deepspeed.ds_config import build_ds_config
    from mtp_plugin.deepspeed.model import MTPLoss, build_pipeline_module, initialize_engine
    from mtp_plugin.megatron.step import MTPMetrics

    init_deepspeed_cpu()
    world = torch.distributed.get_world_size()
    dp = world // num_stages
    cfg = ExperimentConfig(
        model=model,
        mtp=mtp,
        parallel=ParallelConfig(pipeline_model_parallel_size=num_stages, expert_model_parallel_size=ep_size),
        training=TrainingConfig(
            train_iters=steps + 1,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            lr=lr,
            min_lr=lr,
            lr_warmup_iters=0,
            weight_decay=0.0,
        ),
        data=_no_data(),
    )
    loss = MTPLoss(
        num_depths=mtp.num_depths, depth_weights=mtp.weights, chunk_tokens=chunk_tokens, eod_id=None, lam=lam
    )
    pipe = build_pipeline_module(model, mtp, num_stages=num_stages, loss=loss, ep_size=ep_size)
    samples = pattern_samples(64, model.seq_length, model.vocab_size)
    # Before DeepSpeed wraps the module: the one-stage pipe against the core reference on one micro-batch.
    reference = core_reference_check(pipe, loss, samples[:micro_batch_size], lam) if num_stages == 1 else None
    engine = initialize_engine(
        pipe,
        build_ds_config(cfg, data_parallel_size=dp, user={}),
        weight_decay=0.0,
        ep_size=ep_size if model.is_moe else None,
    )
    initial_embed = pipe.tied_modules["embed"].weight.detach().clone()
    batches = pipe_batches(
        samples, micro_batch_size=micro_batch_size, dp_rank=engine.grid.get_data_parallel_id(), dp_size=dp
    )
    from mtp_plugin.deepspeed.meter import DeepSpeedRhoMeter

    meter = DeepSpeedRhoMeter(model, mtp.num_depths).attach(pipe, loss)
    window = MTPMetrics(mtp.num_depths)
    losses, depth_metrics = [], []
    for _ in range(steps):
        metrics = MTPMetrics(mtp.num_depths)
        loss.metrics = metrics
        losses.append(float(engine.train_batch(batches)))
        meter.end_step()
        window.merge(metrics)
        depth_metrics.append(
            metrics.reduce(engine.grid.get_data_parallel_group()) if engine.is_last_stage() else {}
        )
    local_flops = meter.local_flops()
    rho = meter.reduce(metrics=window, elapsed_s=1.0)
    tied = {key: module.weight.detach().clone() for key, module in pipe.tied_modules.items()}
    return {
        "stage": engine.stage_id,
        "losses": losses,
        "metrics": depth_metrics,
        "tied": tied,
        "parts": list(pipe.parts),
        "initial_embed": initial_embed,
        "local_flops": local_flops,
        "reference": reference,
        "rho": rho,
    }


def _no_data():
    from mtp_plugin.config import DataConfig

    # The workers feed synthetic windows; DataConfig wants a prefix but nothing reads it.
    return DataConfig(train_prefix="unused", eod_id=0)


def core_reference_check(pipe, loss, window: torch.Tensor, lam: float) -> dict:
    """The pipe's loss and gradients on one micro-batch (its layer tuple plumbing, `MTPLoss`, chunked CE)
    and the core reference's on the same modules' weights: the trunk run layer by layer, the depths through
    the core `MTPStack` (its own shifts of Emb(t_(i+k))), targets from `all_depth_targets`, the loss from
    `multi_token_loss` with full logits (chunk_tokens=0). Returns both losses and gradient dicts."""
    from mtp_plugin.core import MTPStack, all_depth_targets, linear_cross_entropy_plain, multi_token_loss
    from mtp_plugin.deepspeed.model import FinalNormPipe, MTPDepthPipe, TrunkLayerPipe

    ids, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    mask = torch.ones_like(labels, dtype=torch.bool)
    params = dict(pipe.named_parameters())

    def grads() -> dict:
        out = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = None
        return out

    pipe_loss = loss(pipe((ids,)), (labels, mask.float()))
    pipe_loss.backward()
    pipe_grads = grads()

    layers = [m for m in pipe.forward_funcs if isinstance(m, torch.nn.Module)]
    embedding = pipe.tied_modules["embed"]
    head = pipe.tied_modules["head"] if "head" in pipe.tied_modules else embedding  # noqa: SIM401 - ModuleDict
    h, aux = embedding.lookup(ids), torch.zeros(())
    for layer in (m for m in layers if isinstance(m, TrunkLayerPipe)):
        h, layer_aux = layer.layer(h)
        aux = aux + layer.aux_coeff * layer_aux
    (final,) = [m for m in layers if isinstance(m, FinalNormPipe)]
    h0 = final.norm(h)
    depths = [m for m in layers if isinstance(m, MTPDepthPipe)]
    stack = MTPStack([d.mtp for d in depths])
    hiddens = stack(h0, ids, embed=lambda shifted, k: embedding.lookup(shifted))
    for d in depths:
        aux = aux + d.aux_coeff * d.mtp.block.last_aux
    main = linear_cross_entropy_plain(h0, head.weight, labels, mask)
    targets = all_depth_targets(ids, labels, mask, len(depths))
    out = multi_token_loss(
        main_loss=main.loss_sum / main.num_tokens,
        depth_hidden=hiddens,
        head_weight=head.weight,
        depth_labels=[t.labels_bs for t in targets],
        depth_masks=[t.loss_mask_bs for t in targets],
        lam=lam,
        chunk_tokens=0,
    )
    ref_loss = out.total + aux
    ref_loss.backward()
    return {
        "pipe_loss": pipe_loss.detach(),
        "ref_loss": ref_loss.detach(),
        "pipe_grads": pipe_grads,
        "ref_grads": grads(),
    }
