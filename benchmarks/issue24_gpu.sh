#!/usr/bin/env bash
# Issue 24's measurements in one device call of under 4 minutes (one H100/H200; BENCHMARKS.md "MTP step:
# interleaved rounds"): the GPU test of the fused main head, the interleaved rounds on the GPU-bound shape
# (native and plugin at D = 1 and 3 in the same process and rounds) and on DESIGN.md's benchmark shape at
# D = 1, and one depth's parts there. Run from the repository root with megatron-core importable; results
# in $OUT (each bench also leaves a .partial.json after every configuration-round).
set -uo pipefail
OUT=${OUT:-/tmp/issue24}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # one process builds every configuration in turn
CONFIGS_GB=${CONFIGS_GB:-none-L5,native-D1,fused-D1,native-D3,fused-D3}
CONFIGS_BENCH=${CONFIGS_BENCH:-none-L9,native-D1,fused-D1}
ROUNDS=(--rounds 3 --warmup 2 --steps 4)

timeout "${TEST_TIMEOUT:-45}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_fused_cross_entropy.py -k per_token 2>&1 |
    tail -4 | tee "$OUT/gpu_tests.txt"

python3 benchmarks/bench_mtp.py --shape gpu-bound --configs "$CONFIGS_GB" "${ROUNDS[@]}" --budget-s "${BUDGET_GB:-80}" \
    ${BREAKDOWN_GB:+--breakdown --breakdown-reps 6} --out "$OUT/bench_mtp_gpu_bound.json" --table "$OUT/bench_mtp_gpu_bound.md" 2>&1 | grep -v Warning

[ "$CONFIGS_BENCH" = - ] && exit 0  # the device time left covers the GPU-bound shape only
python3 benchmarks/bench_mtp.py --shape bench --configs "$CONFIGS_BENCH" "${ROUNDS[@]}" --budget-s 45 \
    --breakdown --breakdown-reps 6 --out "$OUT/bench_mtp_bench.json" --table "$OUT/bench_mtp_bench.md" 2>&1 |
    grep -v Warning
