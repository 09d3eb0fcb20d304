#!/usr/bin/env bash
# Issue 24's measurements in one device call (one H100/H200; BENCHMARKS.md "MTP step: interleaved rounds"):
# the GPU tests of the fused main head, the interleaved rounds on the GPU-bound shape and on DESIGN.md's
# benchmark shape (native and plugin in the same process and rounds), one depth's parts, and the ρ meter
# on vs off. Sized for ~5 minutes of device time. Run from the repository root with megatron-core
# importable; results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/issue24}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # one process builds every configuration in turn
CONFIGS_GB=${CONFIGS_GB:-none-L5,native-D1,fused-D1,native-D2,fused-D2,native-D3,fused-D3}
CONFIGS_BENCH=${CONFIGS_BENCH:-none-L9,native-D1,fused-D1,native-D3,fused-D3}
ROUNDS=(--rounds 3 --warmup 2 --steps 4)

timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_fused_cross_entropy.py \
    tests/gpu/test_gpu_megatron.py -k "per_token or moe-fused" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"

python3 benchmarks/bench_mtp.py --shape gpu-bound --configs "$CONFIGS_GB" "${ROUNDS[@]}" --budget-s 105 \
    --out "$OUT/bench_mtp_gpu_bound.json" --table "$OUT/bench_mtp_gpu_bound.md" 2>&1 | grep -v Warning

python3 benchmarks/bench_mtp.py --shape bench --configs "$CONFIGS_BENCH" "${ROUNDS[@]}" --budget-s 85 \
    --breakdown --breakdown-reps 6 --out "$OUT/bench_mtp_bench.json" --table "$OUT/bench_mtp_bench.md" 2>&1 |
    grep -v Warning

python3 benchmarks/bench_meter.py --shape gpu-bound --config fused-D1 --peak-tflops 989 --rounds 2 --block 4 \
    --warmup 2 --out "$OUT/bench_meter_gpu_bound.json" 2>&1 | grep -v Warning | tail -8
