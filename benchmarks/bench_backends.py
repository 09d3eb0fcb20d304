"""backend=megatron against backend=deepspeed at the same small shape: step time, peak memory, tokens/s.

Issue 12's GPU benchmark of the DeepSpeed path. Each backend trains through the app's entry point
(`python -m mtp_plugin.train`) in its own process, with the same overrides: `experiment=smoke_gpu` (the
`small` MoE, hidden 1024, 8 layers, 16 experts top-2, D = 2 with DeepSeek-V3's scaled λ schedule, bf16, the
demo corpus) at `--iters` iterations, one log line per iteration, no validation, checkpoints or TensorBoard.
The smoke_gpu shape is one that backend=deepspeed accepts as is (no MLA, softmax top-k routing, no dropout,
no TP/SP/CP, plainly causal attention: mtp_plugin/deepspeed/config.py), so nothing differs between the two
runs but `backend=`. From each run's log lines (mtp_plugin/train/logs.py) it reports the median and min of
"elapsed time per iteration (ms)" over the iterations after the first `--warmup`, the peak memory
(torch.cuda.max_memory_allocated), the median tokens/s over the same iterations and the last iteration's
lm / mtp_k losses; a markdown table on stdout, everything (and each run's log tail) as JSON in `--out`.

    python3 benchmarks/bench_backends.py --out bench_backends_h200.json
    python3 benchmarks/bench_backends.py --cpu-smoke --out /tmp/bench_backends_cpu.json   # parsing check

DeepSpeed builds no op here (the backend uses torch's AdamW, DS_BUILD_OPS=0 wheels carry none); on CUDA each
run gets an empty TORCH_EXTENSIONS_DIR, and a JIT build (files there, or DeepSpeed's "Time to load ... op"
line) is reported in the row's `jit_ops`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mtp_plugin.train.logs import parse_log_line  # noqa: E402  (the app's own log-line parser)

BACKENDS = ("megatron", "deepspeed")
# What both runs share beyond the preset: per-iteration log lines, nothing written besides the log.
QUIET_RUN = [
    "training.log_interval=1",
    "training.eval_interval=0",
    "training.save_interval=0",
    "training.exit_interval=0",
    "training.save_dir=null",
    "training.load_dir=null",
    "training.tensorboard_dir=null",
    "training.progress_bar=off",
]
GPU_SHAPE = ["experiment=smoke_gpu", "backend.params_dtype=bfloat16"]
# CPU smoke: the toy MoE (fp32, clip 0 as CPU Megatron needs), short sequences, a handful of iterations.
CPU_SHAPE = [
    "experiment=toy_demo",
    "backend.params_dtype=float32",
    "model.seq_length=64",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "training.lr_warmup_iters=1",
]
_JIT_RE = re.compile(r"Building extension module|Time to load \w+ op|Loading extension module")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_backends.json"))
    p.add_argument(
        "--iters", type=int, default=None, help="training.train_iters (default 25; 6 with --cpu-smoke)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="iterations left out of the medians (5; 2 on CPU)"
    )
    p.add_argument("--global-batch-size", type=int, default=16, help="training.global_batch_size on GPU")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per backend run before it is killed")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, in run order")
    p.add_argument("--cpu-smoke", action="store_true", help="experiment=toy_demo on CPU: checks the parsing")
    p.add_argument("--keep-dir", type=Path, default=None, help="run directories here (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every backend")
    return p


def run_overrides(backend: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    shape = (
        CPU_SHAPE if args.cpu_smoke else [*GPU_SHAPE, f"training.global_batch_size={args.global_batch_size}"]
    )
    # `backend=` after the preset: the command line's group choice wins over the preset's backend option.
    return [
        *shape,
        f"backend={backend}",
        f"training.train_iters={args.iters}",
        *QUIET_RUN,
        *args.overrides,
        f"hydra.run.dir={run_dir}",
    ]


def child_env(args: argparse.Namespace, run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("DS_BUILD_OPS", "0")
    # DeepSpeed compares torch's CUDA with a system nvcc only to build ops; the GPU host may have none.
    env.setdefault("DS_SKIP_CUDA_CHECK", "1")
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")
        # Empty, so that any JIT-built op shows up as files (the CPU smoke keeps the cached shm op instead).
        env["TORCH_EXTENSIONS_DIR"] = str(run_dir / "torch_extensions")
    return env


def summarize(lines: list[str], warmup: int) -> dict:
    """The row of one run from its output lines (training lines only; validation lines are skipped)."""
    train = [f for f in map(parse_log_line, lines) if f is not None and "validation" not in f]
    if not train:
        return {"iterations": 0}
    timed = [f for f in train if f["iteration"] > warmup] or train
    ms = [f["elapsed time per iteration (ms)"] for f in timed]
    peaks = [f["peak memory (GiB)"] for f in train if "peak memory (GiB)" in f]
    last = train[-1]
    losses = {k: v for k, v in last.items() if k == "lm loss" or re.fullmatch(r"mtp_\d+ loss", k)}
    return {
        "iterations": int(last["iteration"]),
        "timed_iterations": len(timed),
        "step_ms_median": statistics.median(ms),
        "step_ms_min": min(ms),
        "step_ms": ms,
        "tokens_per_s": statistics.median(f["tokens per second"] for f in timed),
        "peak_gib": max(peaks) if peaks else None,
        "final_losses": losses,
    }


def run_backend(backend: str, args: argparse.Namespace, root: Path) -> dict:
    run_dir = root / backend
    cmd = [sys.executable, "-m", "mtp_plugin.train", *run_overrides(backend, args, run_dir)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=child_env(args, run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=args.timeout,
        )
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = (
            (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""),
            None,
        )
    wall = time.perf_counter() - start
    lines = output.splitlines()
    ext_dir = run_dir / "torch_extensions"
    jit = sorted({m.group(0) for m in map(_JIT_RE.search, lines) if m})
    if ext_dir.is_dir():
        jit += [f"built: {p.name}" for p in ext_dir.iterdir()]
    row = {
        "backend": backend,
        "rc": rc,
        "timed_out": rc is None,
        "wall_s": round(wall, 1),
        "jit_ops": jit,
        **summarize(lines, args.warmup),
        "command": cmd,
        "log_tail": "\n".join(lines[-40:]),
    }
    status = "timed out" if rc is None else f"rc {rc}"
    print(f"  {backend}: {status}, {row['iterations']} iterations, {wall:.1f} s", flush=True)
    if rc != 0:
        print("\n".join(lines[-25:]), flush=True)
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    depths = sorted({k for r in rows for k in r.get("final_losses", {}) if k != "lm loss"})
    head = ["backend", "rc", "step ms (median)", "min", "tokens/s", "peak GiB", "lm loss", *depths, "wall s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        losses = r.get("final_losses", {})
        cells = [
            r["backend"],
            "timeout" if r["timed_out"] else str(r["rc"]),
            _fmt(r.get("step_ms_median"), ".1f"),
            _fmt(r.get("step_ms_min"), ".1f"),
            _fmt(r.get("tokens_per_s"), ".0f"),
            _fmt(r.get("peak_gib"), ".2f"),
            _fmt(losses.get("lm loss"), ".4f"),
            *(_fmt(losses.get(k), ".4f") for k in depths),
            f"{r['wall_s']:.1f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters is None:
        args.iters = 6 if args.cpu_smoke else 25
    if args.warmup is None:
        args.warmup = 2 if args.cpu_smoke else 5
    if args.iters <= args.warmup:
        raise SystemExit(f"--iters={args.iters} must exceed --warmup={args.warmup} (no timed iteration left)")
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(
            f"--backends: unknown {unknown}; use a comma-separated subset of {','.join(BACKENDS)}"
        )
    own_data = any(o.split("=", 1)[0].lstrip("+").split(".")[0] == "data" for o in args.overrides)
    if not own_data and not (REPO / "data_cache" / "demo").exists():
        raise SystemExit(
            f"{REPO / 'data_cache/demo'} is missing: run `make data` (the demo corpus) first, or give "
            "data.train_prefix=... data.valid_prefix=... as overrides"
        )
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        root = args.keep_dir or Path(tmp)
        rows = [run_backend(b, args, root) for b in backends]
    device = "cpu"
    if not args.cpu_smoke:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    shape = CPU_SHAPE if args.cpu_smoke else GPU_SHAPE
    print(f"\ndevice: {device}   shape: {' '.join(shape)}   iters {args.iters}, medians after {args.warmup}")
    print(table(rows))
    for r in rows:
        if r["jit_ops"]:
            print(f"warning: {r['backend']} JIT-built ops: {r['jit_ops']}")
    record = {
        "device": device,
        "shape_overrides": shape,
        "shared_overrides": QUIET_RUN + list(args.overrides),
        "iters": args.iters,
        "warmup": args.warmup,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    ok = all(r["rc"] == 0 and r["iterations"] == args.iters for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
