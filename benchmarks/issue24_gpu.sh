#!/usr/bin/env bash
# Issue 24's measurements in one device call (~9 minutes of one H100/H200; BENCHMARKS.md "MTP step:
# interleaved rounds"): the GPU tests of the fused main head, the interleaved rounds on the GPU-bound shape
# and on DESIGN.md's benchmark shape (native and plugin at D = 1, 2, 3 in the same process and rounds), one
# depth's parts, and the ρ meter on vs off. Run from the repository root with megatron-core importable;
# results in $OUT (each bench also leaves a .partial.json after every configuration-round). The knobs below
# trim it to the device time at hand (CONFIGS_BENCH=- skips the benchmark shape). Rounds run --isolated: in
# one process a configuration's memory outlives it (bench_mtp.py, LEFT_OVER_GIB).
set -uo pipefail
OUT=${OUT:-/tmp/issue24}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # one process builds every configuration in turn
CONFIGS_GB=${CONFIGS_GB:-none-L5,native-D1,fused-D1,native-D2,fused-D2,native-D3,fused-D3}
CONFIGS_BENCH=${CONFIGS_BENCH:-none-L9,native-D1,fused-D1,native-D2,fused-D2,native-D3,fused-D3}
ROUNDS=(--rounds 3 --warmup 2 --steps 5)

timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_fused_cross_entropy.py \
    tests/gpu/test_gpu_megatron.py -k "per_token or bf16 or chunked_loss" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"

python3 benchmarks/bench_mtp.py --shape gpu-bound --isolated --configs "$CONFIGS_GB" "${ROUNDS[@]}" --budget-s "${BUDGET_GB:-165}" \
    ${BREAKDOWN_GB:+--breakdown --breakdown-reps 6} --out "$OUT/bench_mtp_gpu_bound.json" \
    --table "$OUT/bench_mtp_gpu_bound.md" 2>&1 | grep -v Warning

if [ "$CONFIGS_BENCH" != - ]; then
    python3 benchmarks/bench_mtp.py --shape bench --isolated --configs "$CONFIGS_BENCH" "${ROUNDS[@]}" \
        --budget-s "${BUDGET_BENCH:-165}" --breakdown --breakdown-reps 6 --out "$OUT/bench_mtp_bench.json" \
        --table "$OUT/bench_mtp_bench.md" 2>&1 | grep -v Warning
fi

[ -n "${SKIP_METER:-}" ] || python3 benchmarks/bench_meter.py --shape gpu-bound --config fused-D1 --peak-tflops 989 \
    --rounds 3 --block 6 --warmup 3 --out "$OUT/bench_meter_gpu_bound.json" 2>&1 | grep -v Warning | tail -8
