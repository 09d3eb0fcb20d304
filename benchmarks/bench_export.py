"""Export time and peak memory of `python -m mtp_plugin.convert export` (CPU).

    python benchmarks/bench_export.py [--out bench_export.json] [--max-shard-size 1GiB] [--keep DIR] [overrides ...]

Default: `model=deepseek_v3_small mtp=d2` (MLA, ~0.9 B parameters, D = 2, fp32). Step 1 writes a checkpoint of
that model in the app's format with its random initialisation (the import's weights-only writer with no
source tensors: training the model on CPU to get one is impractical); step 2 exports it in a fresh process
and reads that process's peak resident memory (getrusage of the child). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRITE = """
import sys
from pathlib import Path
from mtp_plugin.convert.megatron_io import write_weights_only
from mtp_plugin.train.hydra_app import compose_experiment, quiet_megatron
quiet_megatron()
cfg = compose_experiment(sys.argv[2:])
write_weights_only(cfg, Path(sys.argv[1]), lambda key: None)
"""
# The export in a fresh process that reports its own peak resident memory (KiB on Linux) as its last line.
EXPORT = """
import resource, runpy, sys
sys.argv = ["mtp_plugin.convert", *sys.argv[1:]]
try:
    runpy.run_module("mtp_plugin.convert", run_name="__main__")
finally:
    print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_export.json")
    parser.add_argument("--max-shard-size", default="1GiB")
    parser.add_argument("--keep", help="write the checkpoint and the export here instead of a temporary dir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    # CPU: the allgather dispatcher (alltoall needs CUDA streams); it changes no tensor.
    overrides = args.overrides or [
        "model=deepseek_v3_small",
        "mtp=d2",
        "model.moe_token_dispatcher_type=allgather",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        checkpoint, hf = root / "checkpoint", root / "hf"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE, str(checkpoint), *overrides], env=env, check=True)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", EXPORT, "export", "--checkpoint", str(checkpoint)]
            + ["--out", str(hf), "--max-shard-size", args.max_shard_size],
            env=env,
            capture_output=True,
            text=True,
        )
        export_s = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        log, peak = proc.stdout.strip().rsplit("\n", 1) if "\n" in proc.stdout.strip() else ("", proc.stdout)
        peak_kib = int(peak.split()[-1])
        writer_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the writer: the larger child
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        config = json.loads((hf / "config.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        result = {
            "overrides": overrides,
            "max_shard_size": args.max_shard_size,
            "checkpoint_write_s": round(write_s, 1),
            "export_s": round(export_s, 1),
            "export_bytes": index["metadata"]["total_size"],
            "shards": len(shards),
            "largest_shard_bytes": max((hf / s).stat().st_size for s in shards),
            "export_peak_rss_mib": round(peak_kib / 1024, 1),
            "writer_peak_rss_mib": round(writer_kib / 1024, 1),
            "num_hidden_layers": config["num_hidden_layers"],
            "num_nextn_predict_layers": config["num_nextn_predict_layers"],
            "export_log": log.strip(),
        }
    print(
        "| model | export size (MB) | shards | export (s) | export peak RSS (MiB) | writer peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {' '.join(overrides)} | {result['export_bytes'] / 1e6:.0f} | {result['shards']} | {result['export_s']} | "
        f"{result['export_peak_rss_mib']} | {result['writer_peak_rss_mib']} |"
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
