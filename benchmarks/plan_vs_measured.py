"""The planner's per-GPU memory estimate for a configuration beside the peak a real run measures (CUDA).

    python benchmarks/plan_vs_measured.py [--iters 4] [--out plan_vs_measured.json] [overrides ...]

Default: `experiment=smoke_gpu` (the `small` MoE, bf16, D = 2, micro-batch 4 x 2048 on one GPU). Step 1
plans it (`python -m mtp_plugin.plan ... --json`, meta device); step 2 trains it for a few iterations
through the app (`python -m mtp_plugin.train`, no checkpoints or TensorBoard), whose log line carries
`peak memory (GiB)` (torch.cuda.max_memory_allocated). Prints both, their ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--out", default="plan_vs_measured.json")
    parser.add_argument("overrides", nargs="*", default=["experiment=smoke_gpu"])
    args = parser.parse_intermixed_args()
    overrides = args.overrides or ["experiment=smoke_gpu"]

    plan = subprocess.run(
        [sys.executable, "-m", "mtp_plugin.plan", *overrides, "--json"], capture_output=True, text=True
    )
    if plan.returncode:
        print(plan.stderr, file=sys.stderr)
        return plan.returncode
    report = json.loads(plan.stdout)
    planned = max(m["total"] for m in report["memory_per_stage_gib"])

    with tempfile.TemporaryDirectory() as run_dir:
        train = subprocess.run(
            [
                sys.executable,
                "-m",
                "mtp_plugin.train",
                *overrides,
                f"training.train_iters={args.iters}",
                "training.lr_warmup_iters=1",
                "training.log_interval=1",
                "training.eval_interval=0",
                "training.save_interval=0",
                "training.save_dir=null",
                "training.load_dir=null",
                "training.tensorboard_dir=null",
                "training.progress_bar=off",
                f"hydra.run.dir={run_dir}",
            ],
            capture_output=True,
            text=True,
        )
    if train.returncode:
        print(train.stdout[-3000:], train.stderr[-3000:], file=sys.stderr)
        return train.returncode
    peaks = [float(x) for x in re.findall(r"peak memory \(GiB\): ([0-9.]+)", train.stdout)]
    if not peaks:
        print("no `peak memory (GiB)` in the training log (is CUDA available?)", file=sys.stderr)
        return 1
    measured = max(peaks)
    row = {
        "overrides": overrides,
        "planned_peak_gib": planned,
        "measured_peak_gib": measured,
        "planned_over_measured": planned / measured,
        "planned_breakdown_gib": report["memory_per_stage_gib"],
    }
    print("| config | planned GiB | measured GiB (max_memory_allocated) | planned / measured |")
    print("|---|---|---|---|")
    print(f"| {' '.join(overrides)} | {planned:.2f} | {measured:.2f} | {planned / measured:.3f} |")
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    return 0 if abs(planned / measured - 1) <= 0.15 else 3


if __name__ == "__main__":
    sys.exit(main())
