"""Step time and peak GPU memory: no MTP, Megatron's native MTP, the plugin's MTP, in interleaved rounds.

Shapes (`--shape`): `bench`, DESIGN.md §6's (hidden 1024, 8 layers, all MoE with 16 experts top-2 and
expert FFN 4096, 16 heads), host-bound on one H100/H200; `gpu-bound` (hidden 2048, 4 layers, 4 experts
top-2 with expert FFN 6144), chosen so that the GPU and not Python sets the step (BENCHMARKS.md). Both:
vocab 50304, seq 2048, micro-batch 4, bf16, Megatron's local spec (no TransformerEngine), pp=tp=ep=1.
One step = forward + backward + optimizer (Megatron DDP, fp32 grad buffers, Megatron's bf16 Adam with
fp32 master weights, clip 1.0), one micro-batch of fixed random tokens.

Measurement (issue 24): `--rounds` interleaved rounds over the configurations (each round starts one
configuration later); each configuration-round builds its model, runs `--warmup` steps and times
`--steps` (host clock around a synchronised step). Per configuration: the median over rounds of the
round medians, the rounds' spread, the GPU kernel time of one profiled step (last round; torch.profiler),
its share of the step, kernel launches and host reads of device values (`aten::_local_scalar_dense`).
Memory (first round; torch.cuda allocator, not the reserved pool): `peak` is max_memory_allocated over
the warm-up and timed steps (reset after the first step, once Adam's states exist); one more untimed
step splits it into forward+backward and optimizer peaks and what the forward keeps for backward.
Configurations run in this process one after another (a warm-up per round; Megatron's native MTP keeps a
process-global tracker, cleared per configuration), or each in a fresh process with `--isolated`.

    python benchmarks/bench_mtp.py --shape gpu-bound --out bench.json --table bench.md

Configurations: `none`, `none-L{n}` (no MTP, n trunk layers: one more than the shape's is the arithmetic
of an MTP depth without its head), `native-D{k}`, `plugin-D{k}` (loss_chunk_tokens=0: full logits per
head), `chunked-D{k}` (loss_chunk_tokens=--chunk-tokens, torch ops) and `fused-D{k}` (the same with the
Triton kernels, mtp.loss_kernel=triton; the main head on the same path). On CUDA the driver also times
the head's three GEMMs and eh_proj's three alone, and head + CE alone per implementation (`head` in the
JSON); `--breakdown` times each part of depth 1 alone for native and the plugin. The script prints one
met/missed line per target of issue 24.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from a checkout without installing the package


KINDS = ("native", "plugin", "chunked", "fused")

# `bench`: DESIGN.md §6's shape, host-bound on one H100/H200 (6,400+ kernel launches a step: the local
# spec's Python loop over 16 experts). `gpu-bound`: 4x fewer experts, each 2x wider, hidden 2048, half the
# layers: ~4x fewer launches for ~2x the FLOPs, so the GPU and not Python sets the step (kernel time
# >= 85% of it, checked by the run); native D = 3 fits 80 GB (`python -m mtp_plugin.plan`-style estimate in
# BENCHMARKS.md). Step-time targets: <= 0.95x native on `bench`, <= 0.90x on `gpu-bound` (issue 24).
SHAPES = {
    "bench": dict(hidden=1024, layers=8, heads=16, experts=16, topk=2, moe_ffn_hidden_size=4096),
    "gpu-bound": dict(hidden=2048, layers=4, heads=16, experts=4, topk=2, moe_ffn_hidden_size=6144),
}
STEP_TARGET = {"bench": 0.95, "gpu-bound": 0.90}
GPU_BOUND_SHARE = 0.85  # kernel time / step time for a step the GPU bounds


def config_names(depths: list[int], layers: int = 8) -> list[str]:
    names = ["none", f"none-L{layers + 1}"]
    for d in depths:
        names += [f"{kind}-D{d}" for kind in KINDS]
    return names


def parse_name(name: str) -> tuple[str, int]:
    if name == "none" or name.startswith("none-L"):
        return "none", 0
    kind, depth = name.rsplit("-D", 1)
    if kind not in KINDS:
        raise ValueError(f"unknown configuration {name!r}: use none, none-L<n> or <{'|'.join(KINDS)}>-D<k>")
    return kind, int(depth)


def num_layers_of(name: str, default: int) -> int:
    """`none-L9` -> 9 trunk layers; every other configuration has the shape's `default`."""
    return int(name.split("-L", 1)[1]) if name.startswith("none-L") else default


# ----------------------------------------------------------------------------------- one configuration


def _init_distributed(seed: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def _build(args, kind: str, depth: int, num_layers: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from mtp_plugin.config import LambdaScheduleConfig, ModelConfig, MTPConfig, ParallelConfig
    from mtp_plugin.megatron import (
        build_mtp_gpt_model,
        last_decoder_layer_spec,
        transformer_config_from,
        trunk_layer_spec,
    )

    model_cfg = ModelConfig(
        num_layers=num_layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.moe_ffn_hidden_size,
        seq_length=args.seq,
        vocab_size=args.vocab,
        num_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        first_dense_layers=0,
        # alltoall is what large MoE jobs use; it needs CUDA streams, so a CPU smoke run takes allgather.
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        untie_embeddings_and_output_weights=True,
    )
    mtp_cfg = MTPConfig(
        num_depths=depth,
        lambda_schedule=LambdaScheduleConfig(kind="constant", value=args.lam),
        loss_chunk_tokens=args.chunk_tokens if kind in ("chunked", "fused") else 0,
        loss_kernel="triton" if kind == "fused" else "torch",
    )
    params_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    overrides = {"mtp_loss_scaling_factor": args.lam} if kind == "native" else {}
    config = transformer_config_from(
        model_cfg, ParallelConfig(), mtp_cfg, params_dtype=params_dtype, **overrides
    )
    if kind in ("plugin", "chunked", "fused"):
        model = build_mtp_gpt_model(model_cfg, mtp_cfg, config, pre_process=True, post_process=True)
    else:
        from mtp_plugin.megatron.compat import ensure_moe_router_without_te

        ensure_moe_router_without_te()  # megatron-core 0.16.1 without TransformerEngine
        mtp_block_spec = None
        if kind == "native":
            mtp_block_spec = get_gpt_mtp_block_spec(
                config, last_decoder_layer_spec(config), use_transformer_engine=False
            )
        model = GPTModel(
            config=config,
            transformer_layer_spec=trunk_layer_spec(config),
            vocab_size=model_cfg.padded_vocab_size,
            max_sequence_length=model_cfg.seq_length,
            pre_process=True,
            post_process=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=model_cfg.rotary_base,
            mtp_block_spec=mtp_block_spec,
        )
    if torch.cuda.is_available():
        model = model.cuda()
    return model_cfg, config, model


def _native_loss(loss_mask_bs, output_bs):
    """Megatron-LM pretrain_gpt's loss_func: (masked sum, tokens, report); the MTP loss is already in the graph."""
    loss_sum = (output_bs.float() * loss_mask_bs).sum()
    num_tokens = loss_mask_bs.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}


def setup_training(name: str, args):
    """Build one configuration's model, DDP, optimizer and a `step_once()`; returns a namespace."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from mtp_plugin.megatron import MTPMetrics, mtp_forward_step

    kind, depth = parse_name(name)
    cuda = torch.cuda.is_available()
    _init_distributed(args.seed)
    MTPLossLoggingHelper.tracker.clear()  # process-global; sized by the first native model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    model_cfg, config, model = _build(args, kind, depth, num_layers_of(name, args.layers))
    num_params = sum(p.numel() for p in model.parameters())
    bf16 = args.dtype == "bf16"
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=Float16Module(config, model) if bf16 else model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            clip_grad=args.clip_grad,
        ),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync

    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    b, s = args.micro_batch, args.seq
    tokens_b_s1 = torch.randint(0, args.vocab, (b, s + 1), generator=gen).to(device)
    batch = {
        "tokens": tokens_b_s1[:, :-1].contiguous(),
        "labels": tokens_b_s1[:, 1:].contiguous(),
        "loss_mask": torch.ones(b, s, device=device),
        "position_ids": torch.arange(s, device=device).unsqueeze(0).expand(b, s).contiguous(),
    }
    metrics = MTPMetrics(depth) if kind in ("plugin", "chunked", "fused") else None

    end_of_forward_bytes = []

    def forward_step(data_iterator, m):
        if metrics is not None:
            output, loss_func = mtp_forward_step(data_iterator, m, lam=args.lam, metrics=metrics)
        else:
            mb = next(data_iterator)
            output = m(mb["tokens"], mb["position_ids"], None, labels=mb["labels"], loss_mask=mb["loss_mask"])
            loss_func = partial(_native_loss, mb["loss_mask"])
        # Allocator bookkeeping is host-side: what the forward keeps for backward, read without a sync.
        if cuda:
            end_of_forward_bytes.append(torch.cuda.memory_allocated())
        return output, loss_func

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step_once():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[ddp],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
        )
        return losses

    return SimpleNamespace(
        kind=kind,
        depth=depth,
        cuda=cuda,
        model_cfg=model_cfg,
        model=model,
        ddp=ddp,
        optimizer=optimizer,
        metrics=metrics,
        num_params=num_params,
        step_once=step_once,
        sync=sync,
        end_of_forward_bytes=end_of_forward_bytes,
        batch_tokens=b * s,
        batch=batch,
    )


def run_config(name: str, args, *, memory: bool = True, profile: bool = False) -> dict:
    """One configuration-round: build, `--warmup` steps, `--steps` timed steps, then optionally one
    untimed step splitting the memory peak and one profiled step; the model is freed on return."""
    t = setup_training(name, args)
    kind, depth, cuda, metrics, optimizer = t.kind, t.depth, t.cuda, t.metrics, t.optimizer
    b, s = args.micro_batch, args.seq
    times_s, lm_losses = [], []
    for step in range(args.warmup + args.steps):
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()  # Adam's states exist from the first step on
        if metrics is not None:
            metrics.reset()
        t.sync()
        t0 = time.perf_counter()
        losses = t.step_once()
        ok, grad_norm, _ = optimizer.step()
        t.sync()
        if step >= args.warmup:
            times_s.append(time.perf_counter() - t0)
        lm_losses.append(losses[0]["lm loss"])
    mem = {}
    if cuda:
        mem["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
    if cuda and memory:
        # One more, untimed step with the peaks split between forward+backward and the optimizer.
        if metrics is not None:
            metrics.reset()
        t.sync()
        before_step = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t.step_once()
        t.sync()
        mem["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        mem["kept_after_forward_gib"] = (t.end_of_forward_bytes[-1] - before_step) / GIB
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        t.sync()
        mem["optimizer_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        mem["resident_gib"] = before_step / GIB
    prof = _profile_step(t) if profile else None
    median_s = statistics.median(times_s)
    result = {
        "name": name,
        "impl": name.split("-D")[0],
        "D": depth,
        "ms": 1e3 * median_s,
        "ms_min": 1e3 * min(times_s),
        "peak_gib": mem.get("peak_mem_gib"),
        "kind": kind,
        "num_layers": num_layers_of(name, args.layers),
        "loss_chunk_tokens": args.chunk_tokens if kind in ("chunked", "fused") else 0,
        "num_params": t.num_params,
        "step_ms": [1e3 * x for x in times_s],
        "tokens_per_s": b * s / median_s,
        **mem,
        "lm_loss_first_last": [float(lm[0] / lm[1]) for lm in (lm_losses[0], lm_losses[-1])],
        "last_update_ok": bool(ok),
        "last_grad_norm": None if grad_norm is None else float(grad_norm),
    }
    if metrics is not None:
        result["mtp_losses_last"] = [metrics.reduce()[f"mtp_{k} loss"] for k in range(1, depth + 1)]
    if prof is not None:
        result["profile"] = prof
    return result


# In-process rounds on an H100 (2026-12-07): each configuration left its whole resident memory allocated
# (18.1 GiB after none-L5: weights, gradient buffers, Adam states). Megatron's DDP registers its gradient hooks
# on autograd's AccumulateGrad nodes and keeps those nodes; the cycle runs through autograd's C++ graph, which
# Python's collector cannot see, so a wrapped model lives as long as the process. Measured on CPU too: the
# DistributedDataParallel object and all its parameters survive `gc.collect()` (megatron-core 0.19.2, a tiny
# none-L3). --isolated avoids it.
LEFT_OVER_GIB = 0.5


def _release_memory() -> float:
    """Free what the last configuration left (in-process rounds); GiB still allocated afterwards."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / GIB


# Host reads of device values (.item(), .tolist(), bool(tensor), data-dependent shapes) go through this op.
_HOST_READ_OPS = ("aten::_local_scalar_dense",)


def _profile_step(t, top: int = 25) -> dict:
    """One more step under torch.profiler: total CUDA kernel time, kernel launches, host reads of device
    values and stream synchronisations, and the kernels with the most device time (ms, calls)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if t.metrics is not None:
        t.metrics.reset()
    t.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.cuda else [])
    with profile(activities=activities) as prof:
        t.step_once()
        t.optimizer.step()
    t.sync()
    rows, host_reads, syncs = [], 0, 0
    for evt in prof.key_averages():
        if evt.key in _HOST_READ_OPS:
            host_reads += evt.count
        if evt.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += evt.count
        if evt.device_type != DeviceType.CUDA:
            continue  # CPU ops: their device time is their kernels', counted below
        device_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if device_us > 0:
            rows.append({"kernel": evt.key[:120], "ms": device_us / 1e3, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms"])
    return {
        "kernel_ms": sum(r["ms"] for r in rows),
        "kernel_launches": sum(r["calls"] for r in rows),
        "host_reads": host_reads,
        "stream_syncs": syncs,
        "top_kernels": rows[:top],
    }


# ----------------------------------------------------------------------------------- the head alone


def _cuda_ms(fn, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median, min) milliseconds of `fn()` over `reps` runs, timed with CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # the CPU smoke run of the script
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), min(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def time_head(args) -> dict:
    """The head's three GEMMs alone, and head + CE forward + backward alone per implementation."""
    from mtp_plugin.core import linear_cross_entropy, linear_cross_entropy_per_token

    n, h, v = args.micro_batch * args.seq, args.hidden, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = (0.02 * torch.randn(v, h, device="cuda", generator=gen)).to(torch.bfloat16)
    dlogits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    out = {"tokens": n, "hidden": h, "vocab": v, "gemm_tflop": 3 * 2 * n * h * v / 1e12}
    gemms = {
        "logits = h @ W^T": lambda: hidden @ weight.t(),
        "grad_h = dlogits @ W": lambda: dlogits @ weight,
        "grad_W = dlogits^T @ h": lambda: dlogits.t() @ hidden,
    }
    out["gemm_ms"] = {name: _cuda_ms(fn)[0] for name, fn in gemms.items()}
    out["three_gemms_ms"] = sum(out["gemm_ms"].values())
    out["three_gemms_tflops"] = out["gemm_tflop"] / out["three_gemms_ms"] * 1e3
    # eh_proj ([emb; h] 2h -> h), forward and its two backward products: with the head's three GEMMs,
    # the matrix work a depth adds beyond one more trunk layer (issue 24's bound is 1.5x their time).
    x2h = torch.randn(n, 2 * h, device="cuda", dtype=torch.bfloat16, generator=gen)
    w_eh = (0.02 * torch.randn(h, 2 * h, device="cuda", generator=gen)).to(torch.bfloat16)
    dy = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    eh = {
        "y = x @ W_eh^T": lambda: x2h @ w_eh.t(),
        "grad_x = dy @ W_eh": lambda: dy @ w_eh,
        "grad_W_eh = dy^T @ x": lambda: dy.t() @ x2h,
    }
    out["eh_proj_gemm_ms"] = {name: _cuda_ms(fn)[0] for name, fn in eh.items()}
    out["eh_proj_three_gemms_ms"] = sum(out["eh_proj_gemm_ms"].values())
    x2h = w_eh = dy = None
    dlogits = None  # 0.8 GiB: free it before the head + loss timings

    def head_and_loss(chunk_tokens, kernel):
        def fn():
            hh = hidden.detach().requires_grad_()
            ww = weight.detach().requires_grad_()
            stats = linear_cross_entropy(hh, ww, targets, mask, chunk_tokens=chunk_tokens, kernel=kernel)
            stats.loss_sum.backward()

        return fn

    def main_head_per_token(chunk_tokens):
        def fn():
            hh = hidden.detach().requires_grad_()
            ww = weight.detach().requires_grad_()
            loss_n = linear_cross_entropy_per_token(
                hh, ww, targets, chunk_tokens=chunk_tokens, kernel="triton"
            )
            (loss_n * mask).sum().backward()

        return fn

    out["head_and_loss"] = {}
    for label, fn in [
        ("plain (full logits, autograd)", head_and_loss(0, "torch")),
        (f"fused triton ({args.chunk_tokens} tok)", head_and_loss(args.chunk_tokens, "triton")),
        (
            f"main head per token, fused, recomputed ({args.chunk_tokens} tok)",
            main_head_per_token(args.chunk_tokens),
        ),
    ]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms, ms_min = _cuda_ms(fn, reps=10)
        out["head_and_loss"][label] = {
            "ms": ms,
            "ms_min": ms_min,
            "transient_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
        }
    return out


# ----------------------------------------------------------------------------------- driver


def _shape_args(args) -> list[str]:
    keys = [
        "hidden",
        "layers",
        "heads",
        "experts",
        "topk",
        "moe_ffn_hidden_size",
        "vocab",
        "seq",
        "micro_batch",
        "chunk_tokens",
        "steps",
        "warmup",
        "lam",
        "dtype",
        "clip_grad",
        "seed",
    ]
    out = []
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def run_child(cmd: list[str], timeout: float) -> tuple[dict | None, dict]:
    """Run a benchmark child process; (its `RESULT {json}` line, or None and {"error", "log_tail"})."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), {}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    error = "out of memory" if "OutOfMemoryError" in proc.stderr else f"exit {proc.returncode}"
    return None, {"error": error, "log_tail": tail}


def _run_isolated(name: str, args, *, memory: bool, profile: bool) -> dict:
    flags = (["--child-memory"] if memory else []) + (["--child-profile"] if profile else [])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, *flags, *_shape_args(args)]
    result, failure = run_child(cmd, args.config_timeout)
    return result if result is not None else {"name": name, **failure}


def run_rounds(names: list[str], args, start: float) -> dict[str, list[dict]]:
    """`--rounds` interleaved rounds (A B C, B C A, C A B, ...: each round starts one configuration later,
    so none always follows the same neighbour); memory is split in the first round, one step profiled
    in the last. Each configuration-round builds its model afresh and warms up before it is timed."""
    per_config: dict[str, list[dict]] = {name: [] for name in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            if time.monotonic() - start > args.budget_s:
                per_config[name].append({"name": name, "round": rnd, "error": "skipped (time budget)"})
                continue
            memory, profile = rnd == 0, rnd == args.rounds - 1
            t0 = time.monotonic()
            if args.isolated:
                r = _run_isolated(name, args, memory=memory, profile=profile)
            else:
                try:
                    r = run_config(name, args, memory=memory, profile=profile)
                except torch.OutOfMemoryError:
                    r = {"name": name, "error": "out of memory"}
                r["left_allocated_gib"] = _release_memory()
                if r["left_allocated_gib"] > LEFT_OVER_GIB:
                    print(
                        f"warning: {name} left {r['left_allocated_gib']:.1f} GiB allocated after it was freed; the "
                        "peaks and times of the configurations after it in this process are not comparable; use "
                        "--isolated",
                        flush=True,
                    )
            r["round"] = rnd
            per_config[name].append(r)
            # What has run so far survives a kill at the device call's time limit.
            args.out.with_suffix(".partial.json").write_text(json.dumps(per_config, default=str))
            brief = (
                r.get("error") or f"{r['ms']:.1f} ms (min {r['ms_min']:.1f}), peak {r.get('peak_gib')} GiB"
            )
            print(
                f"[round {rnd + 1}/{args.rounds}, {time.monotonic() - t0:5.1f} s] {name}: {brief}", flush=True
            )
    return per_config


def summarize(name: str, rounds: list[dict]) -> dict:
    """Per configuration: the median over rounds of each round's median step, the rounds' spread
    ((max - min) / median of the round medians), memory from the first round, the profiled step."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"name": name, "error": rounds[0].get("error", "no round ran") if rounds else "not run"}
    medians = [r["ms"] for r in ok]
    med = statistics.median(medians)
    first = ok[0]
    prof = next((r["profile"] for r in ok if "profile" in r), None)
    out = {
        "name": name,
        "kind": first["kind"],
        "D": first["D"],
        "ms": med,
        "round_ms": medians,
        "spread": (max(medians) - min(medians)) / med,
        "ms_min": min(r["ms_min"] for r in ok),
        "peak_gib": first.get("peak_gib"),
        "rounds_run": len(ok),
    }
    for key in ("fwd_bwd_peak_gib", "optimizer_peak_gib", "kept_after_forward_gib", "resident_gib"):
        out[key] = first.get(key)
    if prof is not None:
        out["kernel_ms"] = prof["kernel_ms"]
        out["kernel_share"] = prof["kernel_ms"] / med
        out["kernel_launches"] = prof["kernel_launches"]
        out["host_reads"] = prof["host_reads"]
    return out


def _paired_ratios(per_config: dict[str, list[dict]], name: str, ref: str) -> list[float]:
    """name / ref step medians of the rounds both ran (paired by round: same machine state)."""
    ref_by_round = {r["round"]: r["ms"] for r in per_config.get(ref, []) if "error" not in r}
    return [
        r["ms"] / ref_by_round[r["round"]]
        for r in per_config.get(name, [])
        if "error" not in r and r["round"] in ref_by_round
    ]


def format_table(summary: list[dict]) -> str:
    lines = [
        "| config | step ms (median of rounds) | round medians | spread | GPU kernel ms | kernel share "
        "| kernels | host reads | peak GiB | vs native |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {r["name"]: r for r in summary}
    for r in summary:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | | | | | |")
            continue
        native = by_name.get(f"native-D{r['D']}")
        vs = ""
        if r["kind"] != "native" and native and "error" not in native and r["D"]:
            vs = f"{r['ms'] / native['ms']:.3f}x"

        def num(key, fmt, r=r):
            return "n/a" if r.get(key) is None else fmt.format(r[key])

        lines.append(
            f"| {r['name']} | {r['ms']:.1f} | {' / '.join(f'{m:.1f}' for m in r['round_ms'])} | "
            f"{100 * r['spread']:.1f}% | {num('kernel_ms', '{:.1f}')} | {num('kernel_share', '{:.0%}')} | "
            f"{num('kernel_launches', '{}')} | {num('host_reads', '{}')} | {num('peak_gib', '{:.2f}')} | {vs} |"
        )
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_checks(summary: list[dict], per_config, head: dict | None, args, impl: str = "fused") -> list[str]:
    """Issue 24's targets, one met/missed line each (step ratio, depth cost, memory, GPU-bound share)."""
    ok = {r["name"]: r for r in summary if "error" not in r}
    limit = STEP_TARGET.get(args.shape, 0.95)
    lines = []
    for name, r in ok.items():
        native = ok.get(f"native-D{r['D']}")
        if r["kind"] != impl or native is None:
            continue
        ratio = r["ms"] / native["ms"]
        paired = _paired_ratios(per_config, name, native["name"])
        lines.append(
            f"[{args.shape}] {name} / native-D{r['D']}: {r['ms']:.1f} / {native['ms']:.1f} ms = {ratio:.3f}x "
            f"(per round {', '.join(f'{x:.3f}' for x in paired)}; spreads {100 * r['spread']:.1f}% / "
            f"{100 * native['spread']:.1f}%) target <= {limit:.2f}x: {_met(ratio <= limit)}"
        )
        if r.get("peak_gib") is not None and native.get("peak_gib") is not None:
            bound = native["peak_gib"] - 1.3 * r["D"]
            lines.append(
                f"[{args.shape}] {name} peak {r['peak_gib']:.2f} GiB <= native {native['peak_gib']:.2f} - 1.3 x "
                f"{r['D']} = {bound:.2f}: {_met(r['peak_gib'] <= bound)}"
            )
    deeper = next((r for n, r in ok.items() if n.startswith("none-L")), None)
    d1 = ok.get(f"{impl}-D1")
    if (
        head is not None
        and deeper is not None
        and d1 is not None
        and "kernel_ms" in d1
        and "kernel_ms" in deeper
    ):
        gemms = head["three_gemms_ms"] + head["eh_proj_three_gemms_ms"]
        extra = d1["kernel_ms"] - deeper["kernel_ms"]
        lines.append(
            f"[{args.shape}] {impl}-D1 - {deeper['name']} GPU kernel time {d1['kernel_ms']:.1f} - "
            f"{deeper['kernel_ms']:.1f} = {extra:.1f} ms vs 1.5 x (head's three GEMMs {head['three_gemms_ms']:.2f} "
            f"+ eh_proj's {head['eh_proj_three_gemms_ms']:.2f} ms) = {1.5 * gemms:.1f} ms: {_met(extra <= 1.5 * gemms)} "
            f"(step time: {d1['ms'] - deeper['ms']:+.1f} ms)"
        )
    if args.shape == "gpu-bound":
        for name, r in ok.items():
            if "kernel_share" in r:
                lines.append(
                    f"[{args.shape}] {name}: GPU kernel time {r['kernel_ms']:.1f} ms = {r['kernel_share']:.0%} of "
                    f"the step (GPU-bound: >= {GPU_BOUND_SHARE:.0%}): {_met(r['kernel_share'] >= GPU_BOUND_SHARE)}"
                )
    return lines


# ----------------------------------------------------------------------------------- one depth's parts


def _fwd_bwd_ms(fn, reps: int) -> float:
    """CUDA-event median of fn() + backward of its output (a scalar, or summed against a fixed gradient)."""
    grad = {}

    def step():
        out = fn()
        if out.dim() == 0:
            out.backward()
            return
        if "g" not in grad:
            grad["g"] = torch.randn_like(out)
        out.backward(grad["g"])

    return _cuda_ms(step, reps=reps, warmup=2)[0]


def _depth_parts(t, args) -> dict:
    """fwd + bwd of each part of depth 1, alone, on this model's own modules (CUDA events, median)."""
    from mtp_plugin.core import (
        depth_targets,
        linear_cross_entropy,
        linear_cross_entropy_per_token,
        shift_left,
    )

    model, batch, reps = t.model, t.batch, args.breakdown_reps
    s, b, h = args.seq, args.micro_batch, args.hidden
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ids, labels, mask, pos = batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]
    if t.kind == "native":
        layer = model.mtp.layers[0]
        inner = getattr(layer, "mtp_model_layer", None) or layer.transformer_layer
        enorm, hnorm, final_norm = layer.enorm, layer.hnorm, layer.final_layernorm

        def eh_proj(x):
            return layer.eh_proj(x)[0]
    else:
        depth = model.mtp_stack.depths[0]
        inner, enorm, hnorm, final_norm, eh_proj = (
            depth.block.layer,
            depth.enorm,
            depth.hnorm,
            depth.final_norm,
            depth.eh_proj,
        )

    def leaf(*shape):
        return torch.randn(*shape, device=ids.device, dtype=dtype).requires_grad_()

    h_prev, emb, x_h, h_final = leaf(s, b, h), leaf(s, b, h), leaf(s, b, h), leaf(s, b, h)
    rope = model.rotary_pos_emb(s)
    weight = model.output_layer.weight
    labels_sb, mask_sb = labels.t(), mask.t().bool()
    parts = {}
    if t.kind == "native":
        from megatron.core.transformer.multi_token_prediction import roll_tensor

        def shifts():  # what one native depth rolls: its input ids and positions, then labels and mask
            for x in (ids, pos, labels, mask):
                roll_tensor(x, shifts=-1, dims=-1)

        def head_and_loss():
            logits, _ = model.output_layer(h_final)
            return (model.compute_language_model_loss(labels, logits) * mask).sum()

        main_head = head_and_loss
    else:

        def shifts():
            depth_targets(ids, labels, mask, 1, eod_id=model.eod_id)
            shift_left(ids, 1)
            shift_left(pos, 1)

        def head_and_loss():
            return linear_cross_entropy(
                h_final,
                weight,
                labels_sb,
                mask_sb,
                chunk_tokens=args.chunk_tokens,
                kernel=model.loss_kernel,
                check=False,
            ).loss_sum

        def main_head():
            loss_sb = linear_cross_entropy_per_token(
                h_final, weight, labels_sb, chunk_tokens=args.chunk_tokens, kernel=model.loss_kernel
            )
            return (loss_sb * mask_sb).sum()

    parts["roll / shift of ids, positions, labels, mask"] = _cuda_ms(shifts, reps=reps, warmup=2)[0]
    parts["embedding of the shifted ids"] = _fwd_bwd_ms(
        lambda: model.embedding(input_ids=ids, position_ids=pos), reps
    )
    parts["enorm + hnorm + concat + eh_proj"] = _fwd_bwd_ms(
        lambda: eh_proj(torch.cat([enorm(emb), hnorm(h_prev)], dim=-1)), reps
    )
    parts["the depth's transformer layer"] = _fwd_bwd_ms(
        lambda: inner(hidden_states=x_h, attention_mask=None, rotary_pos_emb=rope)[0], reps
    )
    parts["final norm"] = _fwd_bwd_ms(lambda: final_norm(x_h), reps)
    parts["head + loss (the depth's)"] = _fwd_bwd_ms(head_and_loss, reps)
    parts["main head + loss"] = _fwd_bwd_ms(main_head, reps)
    if t.kind == "native":
        # GPTModel concatenates [h; h^1] after the MTP block and chunks it again before the losses.
        parts["concat [h; h^1] + chunk"] = _fwd_bwd_ms(
            lambda: torch.chunk(torch.cat([h_prev, x_h]), 2)[1], reps
        )
    return parts


def breakdown(args) -> dict:
    """native-D1 and fused-D1: each depth part alone, plus the profiled step's host reads and launches."""
    out = {}
    for name in ("native-D1", "fused-D1" if torch.cuda.is_available() else "chunked-D1"):
        t = setup_training(name, args)
        for _ in range(2):  # allocator, cuBLAS and Triton warm
            if t.metrics is not None:
                t.metrics.reset()
            t.step_once()
            t.optimizer.step()
        t.sync()
        try:
            out[name] = _depth_parts(t, args)
        except Exception as err:  # noqa: BLE001  (report it; the rounds' numbers stand without it)
            out[name] = {"error": f"{type(err).__name__}: {err}"}
        del t
        _release_memory()
        print(f"breakdown {name}: {json.dumps(out[name])}", flush=True)
    return out


def format_breakdown(parts: dict) -> str:
    names = list(parts)
    keys = list(dict.fromkeys(k for n in names for k in parts[n] if k != "error"))
    lines = ["| part of depth 1 (fwd + bwd, alone) | " + " | ".join(f"{n} ms" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key in keys:
        cells = [f"{parts[n][key]:.2f}" if key in parts[n] else "-" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for n in names:
        if "error" in parts[n]:
            lines.append(f"| ({n} failed: {parts[n]['error'][:100]}) |" + " |" * len(names))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark shape and run options (bench_meter.py extends it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="preset of the size flags below")
    p.add_argument("--out", type=Path, default=Path("bench_mtp.json"), help="JSON results")
    p.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument("--depths", default="1,2,3")
    p.add_argument("--configs", default="", help="comma-separated subset of names (default: all)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (bench_meter.py)")
    p.add_argument("--config-timeout", type=float, default=120.0, help="seconds per configuration")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip configurations started after this")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations")
    p.add_argument(
        "--isolated",
        action="store_true",
        help="each configuration-round in a fresh process (default: this process, a warm-up per round; on "
        "CUDA a configuration's memory is not freed in-process: LEFT_OVER_GIB)",
    )
    p.add_argument("--breakdown", action="store_true", help="time one depth's parts, native vs fused (CUDA)")
    p.add_argument("--breakdown-reps", type=int, default=10)
    p.add_argument("--no-head", action="store_true", help="skip timing the head alone (CUDA)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse with `--shape`'s sizes as defaults (explicit size flags still win)."""
    shape = p.parse_known_args(argv)[0].shape
    p.set_defaults(**SHAPES[shape])
    return p.parse_args(argv)


def main(argv=None) -> int:
    p = build_parser()
    args = parse_args(p, argv)

    if args.only:
        if not torch.cuda.is_available():
            from mtp_plugin.train.cpu import enable_megatron_on_cpu

            enable_megatron_on_cpu()  # a CPU smoke run of the script (tiny shapes)
        result = run_config(args.only, args, memory=args.child_memory, profile=args.child_profile)
        print("RESULT " + json.dumps(result), flush=True)
        torch.distributed.destroy_process_group()
        return 0

    names = config_names([int(d) for d in args.depths.split(",") if d], args.layers)
    if args.configs:
        wanted = args.configs.split(",")
        names = [n for n in names if n in wanted] + [
            n for n in wanted if n not in names and n.startswith("none-L")
        ]
    if not args.isolated and not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()  # a CPU smoke run of the script (tiny shapes)
    start = time.monotonic()
    head = None
    if torch.cuda.is_available() and not args.no_head:
        try:
            head = time_head(args)
            print(f"head alone: {json.dumps(head, indent=1)}", flush=True)
        except Exception as err:  # noqa: BLE001  (the rounds stand without it; the error is reported)
            print(f"head alone failed: {type(err).__name__}: {err}", flush=True)
        _release_memory()
    per_config = run_rounds(names, args, start)
    summary = [summarize(name, per_config[name]) for name in names]
    parts = breakdown(args) if args.breakdown else None

    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "mode": "a fresh process per configuration-round"
        if args.isolated
        else "one process, a warm-up per round",
    }
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    table = format_table(summary)
    checks = target_checks(summary, per_config, head, args)
    text = f"{env}\n\n{table}\n"
    if parts is not None:
        text += "\n" + format_breakdown(parts) + "\n"
    text += "\n" + "\n".join(checks)
    print("\n" + text)
    record = {
        "env": env,
        "args": vars(args),
        "head": head,
        "targets": checks,
        "summary": summary,
        "breakdown": parts,
        "rounds": per_config,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str))
    if args.table:
        args.table.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
