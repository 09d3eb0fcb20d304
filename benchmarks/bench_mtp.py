"""Step time and peak GPU memory: no MTP, Megatron's native MTP, the plugin's MTP (plain and chunked loss).

Shape (DESIGN.md §6): hidden 1024, 8 layers (all MoE, 16 experts top-2, expert FFN 4096), 16 heads,
vocab 50304, seq 2048, micro-batch 4, bf16, Megatron's local spec (no TransformerEngine), pp=tp=ep=1.
One step = forward + backward + optimizer (Megatron DDP, fp32 grad buffers, Megatron's bf16 Adam with
fp32 master weights), one micro-batch of fixed random tokens. Step time: median over `--steps` after
`--warmup`. Memory (torch.cuda allocator, not the reserved pool): `peak` is max_memory_allocated over
the warm-up and timed steps (reset after the first step, once Adam's states exist); one more untimed
step splits it into the forward+backward peak and the optimizer-step peak, and `kept after fwd` is what
the forward holds for backward (allocated at the end of the forward minus allocated before the step;
for native MTP this includes every depth's logits, for the chunked path only the head gradients).
Each configuration runs in its own process (clean allocator; Megatron's native MTP keeps a
process-global loss tracker).

    python benchmarks/bench_mtp.py --out bench.json --table bench.md

Configurations: `none`, `none-L{n}` (no MTP, n trunk layers: `none-L9` is one more layer than the
shape's 8, the arithmetic of an MTP depth without its head), `native-D{k}`, `plugin-D{k}`
(loss_chunk_tokens=0: full logits per depth), `chunked-D{k}` (loss_chunk_tokens=--chunk-tokens, head +
CE with grads made in forward, softmax work in fp32 torch ops) and `fused-D{k}` (the same with the Triton
kernels on the bf16 logits chunk, mtp.loss_kernel=triton). On CUDA the driver also times the head's three
GEMMs alone ([tokens x hidden] x [hidden x vocab] forward, and the two backward products) and the head +
CE alone per implementation (`head` in the JSON); `--profile NAMES` adds the top CUDA kernels of one
step of those configurations. Every result has `impl`, `D`, `ms` (median), `ms_min` and `peak_gib`.
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
    )


def run_config(name: str, args) -> dict:
    t = setup_training(name, args)
    kind, depth, cuda, metrics, optimizer = t.kind, t.depth, t.cuda, t.metrics, t.optimizer
    step_once, sync, end_of_forward_bytes, num_params = (
        t.step_once,
        t.sync,
        t.end_of_forward_bytes,
        t.num_params,
    )
    b, s = args.micro_batch, args.seq
    times_s, lm_losses = [], []
    for step in range(args.warmup + args.steps):
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()  # Adam's states exist from the first step on
        if metrics is not None:
            metrics.reset()
        sync()
        t0 = time.perf_counter()
        losses = step_once()
        ok, grad_norm, _ = optimizer.step()
        sync()
        if step >= args.warmup:
            times_s.append(time.perf_counter() - t0)
        lm = losses[0]["lm loss"]
        lm_losses.append(float(lm[0] / lm[1]))
    mem = {}
    if cuda:
        # One more, untimed step with the peaks split between forward+backward and the optimizer.
        mem["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
        if metrics is not None:
            metrics.reset()
        sync()
        before_step = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step_once()
        sync()
        mem["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        mem["kept_after_forward_gib"] = (end_of_forward_bytes[-1] - before_step) / GIB
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        sync()
        mem["optimizer_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        mem["resident_gib"] = before_step / GIB
    profile = _profile_step(t) if cuda and name in args.profile.split(",") else None
    result = {
        "name": name,
        "impl": name.split("-D")[0],
        "D": depth,
        "ms": 1e3 * statistics.median(times_s),
        "ms_min": 1e3 * min(times_s),
        "peak_gib": mem.get("peak_mem_gib"),
        "kind": kind,
        "depths": depth,
        "num_layers": num_layers_of(name, args.layers),
        "loss_chunk_tokens": args.chunk_tokens if kind in ("chunked", "fused") else 0,
        "num_params": num_params,
        "step_ms_median": 1e3 * statistics.median(times_s),
        "step_ms": [1e3 * t for t in times_s],
        "tokens_per_s": b * s / statistics.median(times_s),
        "peak_mem_gib": mem.get("peak_mem_gib"),
        **mem,
        "lm_loss_first_last": [lm_losses[0], lm_losses[-1]],
        "last_update_ok": bool(ok),
        "last_grad_norm": None if grad_norm is None else float(grad_norm),
    }
    if metrics is not None:
        result["mtp_losses_last"] = [metrics.reduce()[f"mtp_{k} loss"] for k in range(1, depth + 1)]
    if profile is not None:
        result["profile_top_kernels"] = profile
    return result


def _profile_step(t, top: int = 25) -> list[dict]:
    """One more step under torch.profiler: the CUDA kernels with the most device time (ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    if t.metrics is not None:
        t.metrics.reset()
    t.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t.step_once()
        t.optimizer.step()
        t.sync()
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if device_us > 0:
            rows.append({"kernel": evt.key[:120], "ms": device_us / 1e3, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"kernel": "(all kernels)", "ms": total, "calls": sum(r["calls"] for r in rows)}] + rows[:top]


# ----------------------------------------------------------------------------------- the head alone


def _cuda_ms(fn, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median, min) milliseconds of `fn()` over `reps` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
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
    from mtp_plugin.core import linear_cross_entropy

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
    dlogits = None  # 0.8 GiB: free it before the head + loss timings

    def head_and_loss(chunk_tokens, kernel):
        def fn():
            hh = hidden.detach().requires_grad_()
            ww = weight.detach().requires_grad_()
            stats = linear_cross_entropy(hh, ww, targets, mask, chunk_tokens=chunk_tokens, kernel=kernel)
            stats.loss_sum.backward()

        return fn

    out["head_and_loss"] = {}
    for label, chunk, kernel in [
        ("plain (full logits, autograd)", 0, "torch"),
        (f"chunked torch ops ({args.chunk_tokens} tok)", args.chunk_tokens, "torch"),
        (f"fused triton ({args.chunk_tokens} tok)", args.chunk_tokens, "triton"),
        (f"fused triton ({n} tok, one chunk)", n, "triton"),
    ]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms, ms_min = _cuda_ms(head_and_loss(chunk, kernel), reps=10)
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
        "profile",
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


def _run_isolated(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, *_shape_args(args)]
    result, failure = run_child(cmd, args.config_timeout)
    return result if result is not None else {"name": name, **failure}


def format_table(results: list[dict]) -> str:
    base = next((r for r in results if r["name"] == "none" and "error" not in r), None)
    lines = [
        "| config | loss path | step ms (median) | min | vs no MTP | peak GiB | Δ peak | fwd+bwd peak GiB "
        "| optimizer peak GiB | kept after fwd GiB | Δ kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def delta(r, key, fmt="{:+.2f}"):
        if base is None or r is base or r.get(key) is None or base.get(key) is None:
            return ""
        return fmt.format(r[key] - base[key])

    def val(r, key):
        return "n/a" if r.get(key) is None else f"{r[key]:.2f}"

    for r in results:
        kind, _ = parse_name(r["name"])
        path = {
            "none": "-",
            "native": "native (full logits)",
            "plugin": "plugin plain (full logits)",
            "chunked": f"plugin chunked, torch ops ({r.get('loss_chunk_tokens', '?')} tok)",
            "fused": f"plugin fused, triton ({r.get('loss_chunk_tokens', '?')} tok)",
        }[kind]
        if "error" in r:
            lines.append(f"| {r['name']} | {path} | {r['error']} | | | | | | | | |")
            continue
        ms = r["step_ms_median"]
        rel = f"{100 * (ms / base['step_ms_median'] - 1):+.1f}%" if base and r is not base else ""
        lines.append(
            f"| {r['name']} | {path} | {ms:.1f} | {r['ms_min']:.1f} | {rel} | {val(r, 'peak_mem_gib')} | "
            f"{delta(r, 'peak_mem_gib')} | {val(r, 'fwd_bwd_peak_gib')} | {val(r, 'optimizer_peak_gib')} | "
            f"{val(r, 'kept_after_forward_gib')} | {delta(r, 'kept_after_forward_gib')} |"
        )
    return "\n".join(lines)


def target_checks(results: list[dict], head: dict | None, impl: str = "fused") -> list[str]:
    """Issue 14's targets, one line each: step <= 0.95x native, D1 - none-L9 <= 1.5x GEMMs, peak."""
    ok = {r["name"]: r for r in results if "error" not in r}
    lines = []
    for name, r in ok.items():
        if r["kind"] != impl or f"native-D{r['D']}" not in ok:
            continue
        native = ok[f"native-D{r['D']}"]
        ratio = r["ms"] / native["ms"]
        lines.append(
            f"{name}: step {r['ms']:.1f} ms = {ratio:.3f}x native {native['ms']:.1f} (target <= 0.95x: "
            f"{'met' if ratio <= 0.95 else 'missed'}); peak {r['peak_gib']:.2f} GiB vs native "
            f"{native['peak_gib']:.2f} - 1.3 x {r['D']} = {native['peak_gib'] - 1.3 * r['D']:.2f} "
            f"({'met' if r['peak_gib'] <= native['peak_gib'] - 1.3 * r['D'] else 'missed'})"
        )
    deeper = next((r for n, r in ok.items() if n.startswith("none-L")), None)
    d1 = ok.get(f"{impl}-D1")
    if head is not None and deeper is not None and d1 is not None:
        extra, bound = d1["ms"] - deeper["ms"], 1.5 * head["three_gemms_ms"]
        lines.append(
            f"{impl}-D1 - {deeper['name']} = {extra:.1f} ms vs 1.5 x the head's three GEMMs "
            f"({head['three_gemms_ms']:.2f} ms) = {bound:.1f} ms: {'met' if extra <= bound else 'missed'}"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The benchmark shape and run options (bench_meter.py extends it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    p.add_argument("--profile", default="", help="comma-separated configurations to profile one step of")
    p.add_argument("--no-head", action="store_true", help="skip timing the head alone (CUDA)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    if args.only:
        if not torch.cuda.is_available():
            from mtp_plugin.train.cpu import enable_megatron_on_cpu

            enable_megatron_on_cpu()  # a CPU smoke run of the script (tiny shapes)
        print("RESULT " + json.dumps(run_config(args.only, args)), flush=True)
        torch.distributed.destroy_process_group()
        return 0

    names = config_names([int(d) for d in args.depths.split(",") if d], args.layers)
    if args.configs:
        wanted = args.configs.split(",")
        names = [n for n in names if n in wanted]
    start = time.monotonic()
    head = None
    if torch.cuda.is_available() and not args.no_head:
        head = time_head(args)
        print(f"head alone: {json.dumps(head, indent=1)}", flush=True)
        torch.cuda.empty_cache()
    results = []
    for name in names:
        if time.monotonic() - start > args.budget_s:
            results.append({"name": name, "error": "skipped (time budget)"})
            continue
        t0 = time.monotonic()
        r = run_config(name, args) if args.in_process else _run_isolated(name, args)
        results.append(r)
        brief = r.get("error") or f"{r['step_ms_median']:.1f} ms, peak {r['peak_mem_gib']} GiB"
        print(f"[{time.monotonic() - t0:5.1f} s] {name}: {brief}", flush=True)

    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    table = format_table(results)
    checks = target_checks(results, head)
    print(f"\n{env}\n\n{table}\n\n" + "\n".join(checks))
    record = {"env": env, "args": vars(args), "head": head, "targets": checks, "results": results}
    args.out.write_text(json.dumps(record, indent=1, default=str))
    if args.table:
        args.table.write_text(f"{env}\n\n{table}\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
