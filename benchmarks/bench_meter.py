"""RhoMeter overhead on a GPU training step: the same model, meter on vs off, in one process.

Shape and step as bench_mtp.py (DESIGN.md §6 benchmark shape, bf16, one micro-batch per step). After
warm-up the run alternates blocks of `--block` steps with the meter attached (hooks, `end_step()` every
step, `reduce()` + `reset()` at the end of each block, i.e. a log interval of `--block` steps) and detached,
`--rounds` times, so that clock drift hits both modes alike. Overhead = median(on) / median(off) - 1;
the per-round ratios are reported too.

    python benchmarks/bench_meter.py --out bench_meter.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mtp  # noqa: E402  (the benchmark's shape, parser and training setup)


def main(argv=None) -> int:
    p = bench_mtp.build_parser()
    p.add_argument("--config", default="chunked-D1", help="a bench_mtp configuration with the plugin's MTP")
    p.add_argument("--block", type=int, default=5, help="steps per block = the meter's log interval")
    p.set_defaults(out=Path("bench_meter.json"), rounds=6)  # --rounds (bench_mtp's): groups of --block pairs
    args = bench_mtp.parse_args(p, argv)
    if not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    bench_mtp._init_distributed(args.seed)
    t = bench_mtp.setup_training(args.config, args)
    if t.metrics is None:
        raise SystemExit(
            f"--config {args.config}: the meter needs the plugin's model (plugin-D* or chunked-D*)"
        )
    from mtp_plugin.config import MTPConfig, ParallelConfig
    from mtp_plugin.megatron import RhoMeter

    class TimedRhoMeter(RhoMeter):
        """The meter with a stopwatch around each hook body: its host time, independent of GPU noise."""

        host_s = 0.0  # inside the forward hooks
        interval_s = 0.0  # end_step + reduce (reduce reads the device: it also waits for queued GPU work)

        def _hook(self, module, fn):
            def timed(*a):
                t0 = time.perf_counter()
                fn(*a)
                TimedRhoMeter.host_s += time.perf_counter() - t0

            super()._hook(module, timed)

    meter = TimedRhoMeter(
        t.model_cfg, MTPConfig(num_depths=t.depth), ParallelConfig(), peak_tflops=args.peak_tflops
    )

    def timed_step(meter_on: bool) -> tuple[float, dict]:
        """One training step; with the meter, also its end_step and a full interval reduce (log interval 1)."""
        fields = {}
        if meter_on:
            meter.attach([t.ddp])  # registers hooks and resets the window: outside the timed region
        t.metrics.reset()
        t.sync()
        t0 = time.perf_counter()
        t.step_once()
        t.optimizer.step()
        if meter_on:
            t1 = time.perf_counter()
            meter.end_step()
            fields = meter.reduce(metrics=t.metrics)
            TimedRhoMeter.interval_s += time.perf_counter() - t1
        t.sync()
        elapsed = time.perf_counter() - t0
        if meter_on:
            meter.detach()
        return elapsed, fields

    for _ in range(args.warmup):
        timed_step(False)
    TimedRhoMeter.host_s = TimedRhoMeter.interval_s = 0.0
    # Alternate single steps (off, on, off, on, ...) so that clock and thermal drift hit both modes alike.
    # Every metered step pays a full log interval (end_step + the all-reduce + log fields): the worst case.
    times = {"off": [], "on": []}
    last_fields = {}
    for i in range(2 * args.rounds * args.block):
        mode = "on" if i % 2 else "off"
        elapsed, fields = timed_step(mode == "on")
        times[mode].append(elapsed)
        last_fields = fields or last_fields
    pairs = [on / off - 1.0 for off, on in zip(times["off"], times["on"])]
    ratios = [statistics.median(pairs[i : i + args.block]) for i in range(0, len(pairs), args.block)]
    off_ms, on_ms = 1e3 * statistics.median(times["off"]), 1e3 * statistics.median(times["on"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    overhead = on_ms / off_ms - 1.0
    print(f"device: {device}   config: {args.config}   steps per mode: {len(times['off'])}")
    print("| meter | step ms (median) |\n|---|---|")
    print(f"| off | {off_ms:.2f} |\n| on | {on_ms:.2f} |")
    print(
        f"overhead: {100 * overhead:+.2f}% (ratio of medians); paired per-step median {100 * statistics.median(pairs):+.2f}%;"
        f" per group: {', '.join(f'{100 * r:+.2f}%' for r in ratios)}"
    )
    paired = statistics.median(pairs)
    print(
        f"target: meter on vs off <= 1% (paired per-step median, issue 24): {100 * paired:+.2f}%: "
        f"{'met' if paired <= 0.01 else 'MISSED'}"
    )
    host_ms = 1e3 * TimedRhoMeter.host_s / len(times["on"])
    interval_ms = 1e3 * TimedRhoMeter.interval_s / len(times["on"])
    print(
        f"meter host time per metered step: hooks {host_ms:.3f} ms = {100 * host_ms / off_ms:.3f}% of the median "
        f"step; end_step + reduce {interval_ms:.3f} ms (includes waiting for the step's queued GPU work)"
    )
    print(
        "meter fields (last interval):",
        {k: round(v, 4) for k, v in last_fields.items() if "rho" in k or "TFLOP" in k or k == "MFU"},
    )
    record = {
        "device": device,
        "config": args.config,
        "args": vars(args),
        "step_ms_off": times["off"],
        "step_ms_on": times["on"],
        "median_ms_off": off_ms,
        "median_ms_on": on_ms,
        "overhead": overhead,
        "per_group_paired_overhead": ratios,
        "paired_overhead_median": statistics.median(pairs),
        "meter_fields": last_fields,
        "meter_hook_host_ms_per_step": host_ms,
        "meter_interval_ms_per_step": interval_ms,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
