# shellcheck shell=bash
# The body every sbatch script under slurm/ sources: it launches `python -m mtp_plugin.train` on the
# allocation, forwards Slurm's time-limit warning to the training, requeues the job when the training
# saved on that warning, and ends the job with the training's exit code. Not an sbatch script itself.
#
# Settings (environment variables; `sbatch --export=ALL,NAME=value ...` or `export NAME=value` first):
#   MTP_LAUNCHER      srun (default): one task per rank, RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/
#                     SLURM_NTASKS/SLURM_LOCALID; torchrun: one torchrun per node, c10d rendezvous;
#                     deepspeed: one `deepspeed --no_ssh` per node with a hostfile of the allocation.
#   MTP_DEVICE        gpu (default: NCCL, one rank per GPU) or cpu (gloo, CUDA hidden; for testing).
#   MTP_PYTHON        the interpreter that has mtp_plugin installed (default: python3 on PATH).
#   MTP_RUN_DIR       the Hydra run directory (default: outputs/slurm/<job name>-<job id>, relative to the
#                     submit directory). Point a new job at an earlier job's directory to resume that run.
#   MTP_SRUN_ARGS     extra srun arguments for the training step, e.g. a container:
#                     "--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-mounts=/lustre".
#   MTP_MAX_REQUEUES  how often the job may requeue itself at its time limit (default 100).
#   MTP_SAVE_TIMEOUT  seconds torchrun gives its ranks to save before SIGKILL (default 600; DeepSpeed: 30).
# Every argument of the sbatch script is a Hydra override passed to the training unchanged.

set -uo pipefail

mtp_log() { echo "[mtp slurm $(date -u +%H:%M:%S)] $*"; }

MTP_EXIT_SIGNAL=3 # mtp_plugin.train's exit code after saving on one of training.exit_signals
launcher=${MTP_LAUNCHER:-srun}
device=${MTP_DEVICE:-gpu}
python=${MTP_PYTHON:-python3}
run_dir=${MTP_RUN_DIR:-outputs/slurm/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
restarts=${SLURM_RESTART_COUNT:-0}
case "$launcher" in srun | torchrun | deepspeed) ;; *)
    mtp_log "MTP_LAUNCHER=$launcher: use srun, torchrun or deepspeed"
    exit 2
    ;;
esac
case "$device" in
gpu)
    # Megatron's tensor/sequence-parallel overlap needs one CUDA connection (kernels in issue order);
    # a failed rank makes the others raise instead of hanging in a collective.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    procs_per_node=${MTP_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    ;;
cpu)
    export CUDA_VISIBLE_DEVICES="" # the app then picks gloo
    procs_per_node=${SLURM_NTASKS_PER_NODE:-1}
    ;;
*)
    mtp_log "MTP_DEVICE=$device: use gpu or cpu"
    exit 2
    ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Rendezvous: the first node of the allocation, at the address Slurm itself reaches it by; a port from
# the job id, so two jobs sharing a node do not collide (below the Linux ephemeral range).
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_addr=$(scontrol show node "$head_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-${head_addr:-$head_node}}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}

# Hydra's run directory holds train.log, .hydra/, checkpoints/ and tensorboard/; the same directory after
# a requeue is what makes the run resume from checkpoints/latest (training.load_dir, the shipped default).
overrides=("$@")
user_run_dir=$(printf '%s\n' "${overrides[@]}" | sed -n 's/^hydra\.run\.dir=//p' | tail -n 1)
if [ -n "$user_run_dir" ]; then
    run_dir=$user_run_dir
else
    overrides+=("hydra.run.dir=$run_dir")
fi
train=("$python" -m mtp_plugin.train "${overrides[@]}")

# shellcheck disable=SC2206  # MTP_SRUN_ARGS is a list of srun arguments on purpose
srun_args=(--kill-on-bad-exit=1 ${MTP_SRUN_ARGS:-})
num_nodes=${SLURM_JOB_NUM_NODES:-${#nodes[@]}}
per_node_step=(--nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
case "$launcher" in
srun)
    # Each task is one rank. A rank that saved on an exit signal (exit 3) reports it in a marker file and
    # exits 0, so that srun's --kill-on-bad-exit (which ends the step at the first non-zero exit: a
    # crashed rank must not leave the others hanging in a collective) leaves the other ranks to finish.
    # The wrapper survives SIGTERM/SIGINT (Slurm signals every process of the step; the rank handles
    # them); the rank starts with USR1 ignored until the training installs its handler. A rank that fails
    # writes its exit code too: srun reports the largest one, often a rank it killed (143) afterwards.
    export MTP_STOP_MARKER=$run_dir/.slurm-stopped-$SLURM_JOB_ID.$restarts
    export MTP_FAILED_MARKER=$run_dir/.slurm-failed-$SLURM_JOB_ID.$restarts
    step=(srun "${srun_args[@]}" bash -c \
        'trap "" USR1; trap : TERM INT; export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
         "$@"; rc=$?; if [ "$rc" = '"$MTP_EXIT_SIGNAL"' ]; then : >"$MTP_STOP_MARKER.$RANK"; exit 0; fi
         [ "$rc" = 0 ] || echo "$rc" >"$MTP_FAILED_MARKER.$RANK"; exit "$rc"' \
        mtp-rank "${train[@]}")
    world_size=${SLURM_NTASKS:-$((num_nodes * procs_per_node))}
    ;;
torchrun)
    # torchrun forwards SIGTERM to its workers and SIGKILLs them MTP_SAVE_TIMEOUT s later (torch >= 2.8
    # reads PET_SHUTDOWN_TIMEOUT; older releases wait 30 s: prefer MTP_LAUNCHER=srun for long saves).
    export PET_SHUTDOWN_TIMEOUT=${MTP_SAVE_TIMEOUT:-600}
    export MTP_HEAD_NODE=$head_node
    step=(srun "${srun_args[@]}" "${per_node_step[@]}" bash -c \
        'trap "" USR1; h=0; [ "$SLURMD_NODENAME" = "$MTP_HEAD_NODE" ] && h=1; exec "$0" -m torch.distributed.run --rdzv-conf=is_host=$h "$@"' \
        "$python" --nnodes="$num_nodes" --nproc-per-node="$procs_per_node" --rdzv-backend=c10d \
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID-$restarts" --max-restarts=0 \
        -m mtp_plugin.train "${overrides[@]}")
    world_size=$((num_nodes * procs_per_node))
    ;;
deepspeed)
    # DeepSpeed's launcher on every node (--no_ssh: no pdsh or ssh between nodes), told the whole
    # allocation by a hostfile; it starts the node's ranks with RANK/LOCAL_RANK/WORLD_SIZE set.
    mkdir -p "$run_dir"
    hostfile=$run_dir/hostfile-$SLURM_JOB_ID
    printf '%s slots='"$procs_per_node"'\n' "${nodes[@]}" >"$hostfile"
    step=(srun "${srun_args[@]}" "${per_node_step[@]}" bash -c \
        'trap "" USR1; exec "$0" -m deepspeed.launcher.runner --node_rank="$SLURM_NODEID" "$@"' \
        "$python" --no_ssh --hostfile="$hostfile" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        --no_local_rank --module mtp_plugin.train "${overrides[@]}")
    world_size=$((num_nodes * procs_per_node))
    ;;
esac

# The time-limit warning (sbatch --signal=B:USR1@LEAD) reaches this batch shell only; it passes it on to
# every process of the training step (scancel --signal). The step's wrappers above start with USR1
# ignored, which torchrun's and DeepSpeed's agents keep (so they do not die of it) and the ranks keep
# until the training installs its handler (training.exit_signals): each rank then gets it once, finishes
# its iteration, saves and exits with MTP_EXIT_SIGNAL.
warned=0
on_warning() {
    warned=1
    mtp_log "time-limit warning (SIGUSR1): asking the training to save and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_warning USR1

mtp_log "job $SLURM_JOB_ID (restart $restarts) on ${num_nodes} node(s) ${SLURM_JOB_NODELIST}: launcher $launcher," \
    "device $device, $world_size rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT, run directory $run_dir"
mtp_log "training: ${train[*]}"
"${step[@]}" &
step_pid=$!
while true; do
    wait "$step_pid"
    rc=$?
    # wait returns > 128 when a trapped signal interrupts it; the step runs on then.
    if [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; then
        continue
    fi
    break
done
if [ "$launcher" = srun ]; then
    if [ "$rc" = 0 ] && compgen -G "$MTP_STOP_MARKER.*" >/dev/null; then
        rc=$MTP_EXIT_SIGNAL # the ranks saved on an exit signal
    elif [ "$rc" != 0 ] && compgen -G "$MTP_FAILED_MARKER.*" >/dev/null; then
        first_failed=$(ls -tr "$MTP_FAILED_MARKER".* | head -n 1)
        rc=$(cat "$first_failed") # the exit code of the rank that failed first
        mtp_log "rank ${first_failed##*.} failed first (exit code $rc)"
    fi
    rm -f "$MTP_STOP_MARKER".* "$MTP_FAILED_MARKER".*
fi
mtp_log "training exited with code $rc"

# Saved on the warning: requeue this job (same id, same run directory), which resumes from the checkpoint.
# torchrun and deepspeed exit 1 after forwarding a signal whatever their ranks returned; their ranks' lines
# above say whether they saved.
if [ "$warned" = 1 ] && { [ "$rc" = "$MTP_EXIT_SIGNAL" ] || { [ "$launcher" != srun ] && [ "$rc" != 0 ]; }; }; then
    if [ "$restarts" -lt "${MTP_MAX_REQUEUES:-100}" ]; then
        mtp_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the latest checkpoint in $run_dir"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        mtp_log "scontrol requeue failed (is the job requeueable? sbatch --requeue)"
    else
        mtp_log "not requeueing: already restarted $restarts times (MTP_MAX_REQUEUES=${MTP_MAX_REQUEUES:-100})"
    fi
fi
exit "$rc"
