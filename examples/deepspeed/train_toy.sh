#!/usr/bin/env bash
# The toy MoE with D = 2 MTP depths on DeepSpeed's pipeline engine: 2 stages x 2 data-parallel ranks,
# experts split over 2 expert-parallel ranks, ZeRO-1, the demo corpus (`make data` builds it).
# Either launcher works; extra arguments are Hydra overrides (e.g. training.train_iters=20).
#   examples/deepspeed/train_toy.sh                 # torchrun, 4 processes
#   LAUNCHER=deepspeed examples/deepspeed/train_toy.sh
# On CPU DeepSpeed compiles its shared-memory communication op once on first use (about a minute; cached in
# ~/.cache/torch_extensions); on GPUs pass backend.params_dtype=bfloat16.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARGS=(backend=deepspeed parallel=pp2_ep2 model=toy mtp=d2 training.train_iters=${ITERS:-30}
      training.log_interval=5 training.eval_interval=0 "$@")
if [[ "${LAUNCHER:-torchrun}" == deepspeed ]]; then
  # --no_local_rank: the app reads LOCAL_RANK from the environment (Hydra would refuse a --local_rank argument).
  exec deepspeed --no_local_rank --num_gpus "${NPROC:-4}" --module mtp_plugin.train "${ARGS[@]}"
fi
exec torchrun --nproc-per-node "${NPROC:-4}" -m mtp_plugin.train "${ARGS[@]}"
