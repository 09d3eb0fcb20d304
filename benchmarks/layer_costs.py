"""Forward + backward time and memory of one trunk layer, one MTP depth and the head + loss (issue 25).

    python benchmarks/layer_costs.py [--iters 10] [--warmup 3] [--out layer_costs.json] [overrides ...]

The configured model (Hydra overrides, as for training; default `experiment=smoke_gpu`) is built on one
device through the training classes (`transformer_config_from`, `build_mtp_gpt_model`, bf16 through
Megatron's Float16Module as training does) with the first dense layer, one MoE layer (when the model has
experts), one MTP depth and the head, at pipeline, tensor and expert parallel size 1. Each piece then runs
alone, forward and backward, on a random input of one micro-batch ([s, b, h] hidden states, token ids):

- `embedding`: the word embedding lookup;
- `dense_layer`, `moe_layer`: one trunk decoder layer of each kind (MoE routing, dispatch and experts);
- `depth`: one MTP depth with its embedding lookup (enorm, hnorm, eh_proj, the depth's layer, final norm);
- `head`: the main head and Megatron's cross-entropy (`output_layer`, `compute_language_model_loss`);
- `depth_head`: one depth's head + loss as the plugin scores it (`linear_cross_entropy`, mtp.loss_chunk_tokens).

Per piece: median milliseconds of the forward alone and of forward + backward, and the peak memory above
what was allocated before it (its activations and the backward's transients; parameter gradients stay
allocated after the warm-up, as Megatron's gradient buffers do). Prints a table and writes the costs file
that `python -m mtp_plugin.plan --costs FILE` reads (schema `mtp_plugin.layer_costs/1`). On CPU it runs
too (timings are then only a smoke test). Nothing here is a unit test: timings vary with the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

SCHEMA = "mtp_plugin.layer_costs/1"


def _setup(seed: int) -> torch.device:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    else:
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not cuda)
    return torch.device("cuda" if cuda else "cpu")


def _build(experiment):
    from megatron.core.transformer.module import Float16Module

    from mtp_plugin.config import ParallelConfig
    from mtp_plugin.megatron import build_mtp_gpt_model, transformer_config_from

    model = experiment.model
    layers = 1 + (1 if model.is_moe else 0) if model.first_dense_layers else 1
    model_cfg = dataclasses.replace(
        model,
        num_layers=layers,
        first_dense_layers=min(model.first_dense_layers, 1),
        # alltoall needs CUDA streams; on CPU the smoke run takes allgather (no parameters differ).
        moe_token_dispatcher_type=model.moe_token_dispatcher_type
        if torch.cuda.is_available()
        else "allgather",
    )
    mtp_cfg = dataclasses.replace(
        experiment.mtp, num_depths=1, depth_weights=[], placement="last", mtp_stage=None
    )
    bf16 = experiment.backend.params_dtype == "bfloat16"
    config = transformer_config_from(
        model_cfg, ParallelConfig(), mtp_cfg, params_dtype=torch.bfloat16 if bf16 else torch.float32
    )
    gpt = build_mtp_gpt_model(model_cfg, mtp_cfg, config, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        gpt = gpt.cuda()
    if bf16:
        Float16Module(config, gpt)  # casts every parameter to bf16 in place, as training does
    return gpt, model_cfg, mtp_cfg


def _timed(step, *, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median ms, peak bytes above the memory allocated before the step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    peak = 0.0
    for _ in range(iters):
        if device.type == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
    return statistics.median(times), peak


def measure(experiment, *, iters: int, warmup: int, seed: int = 1234) -> dict:
    from mtp_plugin.core import linear_cross_entropy

    device = _setup(seed)
    gpt, model_cfg, mtp_cfg = _build(experiment)
    config = gpt.config
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    b, s, h = experiment.training.micro_batch_size, model_cfg.seq_length, model_cfg.hidden_size
    vocab = model_cfg.padded_vocab_size
    gen = torch.Generator(device=device).manual_seed(seed)
    ids_bs = torch.randint(0, vocab, (b, s), device=device, generator=gen)
    labels_bs = torch.randint(0, vocab, (b, s), device=device, generator=gen)
    hidden = torch.randn(s, b, h, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(s, b, h, device=device, dtype=dtype, generator=gen) * 1e-3
    rope = None if config.multi_latent_attention else gpt.rotary_pos_emb(s)

    def leaf():
        return hidden.detach().clone().requires_grad_(True)

    def embedding():
        gpt.embedding(input_ids=ids_bs, position_ids=None).backward(grad)

    def layer(index: int):
        def run():
            out, _ = gpt.decoder.layers[index](hidden_states=leaf(), attention_mask=None, rotary_pos_emb=rope)
            out.backward(grad)

        def forward():
            gpt.decoder.layers[index](hidden_states=leaf(), attention_mask=None, rotary_pos_emb=rope)

        return run, forward

    depth_module = gpt.mtp_stack.depths[0]

    def depth_forward():
        emb = gpt.embedding(input_ids=ids_bs, position_ids=None)
        return depth_module(leaf(), emb, attention_mask=None, rotary_pos_emb=rope)

    def head_forward():
        logits, _ = gpt.output_layer(leaf())
        return gpt.compute_language_model_loss(labels_bs, logits).sum()

    weight = (
        gpt.output_layer.weight
        if gpt.output_layer.weight is not None
        else gpt.embedding.word_embeddings.weight
    )
    mask_sb = torch.ones(s, b, device=device)

    def depth_head_forward():
        return linear_cross_entropy(
            leaf(),
            weight,
            labels_bs.t(),
            mask_sb,
            chunk_tokens=mtp_cfg.loss_chunk_tokens,
            vocab_start=0,
            tp_group=None,
            kernel=mtp_cfg.loss_kernel,
        ).loss_sum

    pieces = {"embedding": (embedding, lambda: gpt.embedding(input_ids=ids_bs, position_ids=None))}
    pieces["dense_layer" if model_cfg.first_dense_layers or not model_cfg.is_moe else "moe_layer"] = layer(0)
    if model_cfg.is_moe and model_cfg.first_dense_layers:
        pieces["moe_layer"] = layer(1)
    pieces["depth"] = (lambda: depth_forward().backward(grad), depth_forward)
    pieces["head"] = (lambda: head_forward().backward(), head_forward)
    pieces["depth_head"] = (lambda: depth_head_forward().backward(), depth_head_forward)

    items = {}
    for name, (fwd_bwd, forward) in pieces.items():
        fwd_bwd_ms, peak = _timed(fwd_bwd, iters=iters, warmup=warmup, device=device)
        fwd_ms, _ = _timed(forward, iters=iters, warmup=warmup, device=device)
        items[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_gib": peak / 1024**3}
    import megatron.core

    return {
        "schema": SCHEMA,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "micro_batch_size": b,
        "seq_length": s,
        "model": dataclasses.asdict(experiment.model),
        "mtp_loss_chunk_tokens": mtp_cfg.loss_chunk_tokens,
        "iters": iters,
        "items": items,
    }


def format_table(costs: dict) -> str:
    lines = [
        f"layer costs on {costs['device']} ({costs['dtype']}, micro-batch {costs['micro_batch_size']} x "
        f"{costs['seq_length']}, hidden {costs['model']['hidden_size']}), medians of {costs['iters']}:",
        f"{'piece':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9}",
    ]
    for name, item in costs["items"].items():
        lines.append(
            f"{name:<12} {item['fwd_ms']:>9.3f} {item['fwd_bwd_ms']:>11.3f} {item['peak_gib']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="layer_costs.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.iters < 1 or args.warmup < 0:
        print("error: --iters must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    from mtp_plugin.train.hydra_app import ConfigError, compose_experiment

    try:
        experiment = compose_experiment(args.overrides or ["experiment=smoke_gpu"])
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 2
    costs = measure(experiment, iters=args.iters, warmup=args.warmup)
    costs["overrides"] = args.overrides or ["experiment=smoke_gpu"]
    print(format_table(costs))
    with open(args.out, "w") as f:
        json.dump(costs, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
