#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py unmodified (native MTP) and patched (mtp_plugin), same flags and seed, one GPU.
#
#   examples/megatron_lm/side_by_side.sh MEGATRON_LM_SCRIPTS_DIR OUT_DIR [extra Megatron-LM flags...]
#
# MEGATRON_LM_SCRIPTS_DIR holds core_v0.19.0's pretrain_gpt.py, model_provider.py and gpt_builders.py
# (`git archive core_v0.19.0 pretrain_gpt.py model_provider.py gpt_builders.py`). Writes OUT_DIR/native.log,
# OUT_DIR/plugin.log and prints the iteration lines of both. Without TransformerEngine/apex the local spec
# and the no-fusion flags below are needed (PLATFORM.md).
set -euo pipefail
src=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/native" "$out/plugin"
cp "$src"/{pretrain_gpt.py,model_provider.py,gpt_builders.py} "$out/native/"
cp "$src"/{pretrain_gpt.py,model_provider.py,gpt_builders.py} "$out/plugin/"
(cd "$out/plugin" && git apply "$here/pretrain_gpt_mtp.core_v0.19.0.patch")

flags=(
  --transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-dropout-fusion --no-bias-swiglu-fusion --no-rope-fusion --no-persist-layer-norm
  --num-layers 4 --hidden-size 512 --num-attention-heads 8 --seq-length 1024 --max-position-embeddings 1024
  --micro-batch-size 2 --global-batch-size 8 --train-iters 8 --lr 1e-4 --seed 1234
  --num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall --disable-bias-linear --swiglu
  --normalization RMSNorm --position-embedding-type rope --mtp-num-layers 2 --mtp-loss-scaling-factor 0.3
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split 100,0,0
  --log-interval 1 --eval-iters 1 --eval-interval 1000
)
for kind in native plugin; do
  port=$((29500 + RANDOM % 1000))
  (cd "$out/$kind" && torchrun --nproc-per-node 1 --master-port "$port" pretrain_gpt.py "${flags[@]}" "$@") \
    > "$out/$kind.log" 2>&1 || { echo "$kind run failed:"; tail -40 "$out/$kind.log"; exit 1; }
  echo "== $kind"
  grep -E "iteration +[0-9]+/ +[0-9]+ \|" "$out/$kind.log" | sed -E 's/^.*(iteration +[0-9]+)\/.*\| (lm loss.*)\| loss scale.*(grad norm: [0-9.]+).*/\1 | \2| \3/'
done
