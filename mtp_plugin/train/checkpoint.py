"""Atomic checkpoints through `megatron.core.dist_checkpointing`.

Layout under `save_dir`:

    iter_0000020/        a finished checkpoint (dist_checkpointing: model, optimizer, per-rank RNG,
                         and in its common part the scheduler, data position, λ schedule, tokens, the
                         rank layout); run_config.json beside them: the model, MTP and data settings a
                         resume must match (checked before any model is built)
    iter_0000030.tmp/    a checkpoint being written; never read
    latest               the name of the newest finished checkpoint ("iter_0000020")

Every rank writes its shards into the `.tmp` directory; after a barrier rank 0 renames it to its final
name and then replaces `latest` through a temporary file and `os.replace`. Both are atomic renames on
POSIX, so a process killed at any point leaves `latest` naming a complete checkpoint. A save that raises
removes its `.tmp` before re-raising; one killed outright leaves it, and the next save removes every
stale `iter_*.tmp` before it starts.

Shards are written in the saving thread (`SyncTorchDistSaveStrategy`): Megatron's default torch_dist writer
starts a multiprocessing Manager (a spawned server and its resource_tracker) and, on 0.16, forked writer
processes, which outlive a run killed with SIGKILL. The files are the same torch_dist format. With `keep_last`, rank 0 then removes the oldest finished
checkpoints beyond that many (never the one `latest` names).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
RUN_CONFIG = "run_config.json"
# Settings a checkpoint is bound to. Parallel layout, lr schedule, intervals and paths may change on resume.
RUN_CONFIG_GROUPS = ("model", "mtp", "data")
RESUMABLE_DATA_FIELDS = ("cache_dir",)
# Where the MTP depths run is pipeline layout, like the parallel sizes: each depth is saved under its global
# index whatever stage holds it, so a checkpoint moves between `last`, `stage` and `split` (recorded, not
# compared).
RESUMABLE_MTP_KEYS = ("mtp.placement", "mtp.mtp_stage")
# A finished backend=deepspeed checkpoint (DeepSpeed's engine files) holds this JSON: format, iteration, layout.
DEEPSPEED_MARKER = "deepspeed_checkpoint.json"


def run_config(cfg) -> dict[str, Any]:
    """The model, MTP and data settings of an ExperimentConfig, as JSON values."""
    from dataclasses import asdict

    groups = {name: asdict(getattr(cfg, name)) for name in RUN_CONFIG_GROUPS}
    for field in RESUMABLE_DATA_FIELDS:
        groups["data"].pop(field, None)
    return json.loads(json.dumps(groups))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def run_config_differences(path: str | os.PathLike, current: dict[str, Any]) -> list[str]:
    """ "mtp.num_depths=2 vs 1" for each setting where checkpoint `path` and `current` differ ([] if none,
    or if the checkpoint predates run_config.json)."""
    stored_path = Path(path) / RUN_CONFIG
    if not stored_path.is_file():
        return []
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{stored_path} is unreadable ({err}); remove that checkpoint or fix the file"
        ) from None
    old, new = _flatten(stored, ""), _flatten(current, "")
    return [
        f"{key}={old.get(key, '(absent)')} vs {new.get(key, '(absent)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and key not in RESUMABLE_MTP_KEYS
    ]


def saved_layout(path: str | os.PathLike) -> dict[str, int] | None:
    """The rank layout checkpoint `path` was written with (None before layouts were stored)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path)).get("layout")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(directory: str | os.PathLike | None) -> Path | None:
    """The finished checkpoint `directory/latest` names, or None when there is none yet."""
    if not directory:
        return None
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not ((path / "metadata.json").is_file() or (path / DEEPSPEED_MARKER).is_file()):
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which is missing or incomplete; point {pointer} at an existing "
            "iter_* directory or remove it to start fresh"
        )
    return path


def sync_save_strategy():
    """Megatron's torch_dist save strategy, written by torch.distributed.checkpoint in this thread."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        # What TorchDistSaveShardedStrategy.async_save prepares, handed to torch's synchronous save instead
        # of Megatron's FileSystemWriterAsync: one writer thread, no Manager, no child process.
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp_save(
                mcore_to_pyt_state_dict(flat, False),
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _sharded_state(model, optimizer, *, is_loading: bool, common: dict[str, Any]) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    # What Megatron-LM's checkpointing passes (_build_sharded_state_dict_metadata): the group over which
    # replicated tensors are deduplicated, and the current (prefix-free) chained-optimizer key format.
    metadata = {
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }
    if getattr(optimizer.config, "use_distributed_optimizer", False):
        metadata["distrib_optim_sharding_type"] = "fully_sharded_model_space"
    model_sd = model.sharded_state_dict(metadata=metadata)
    optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    if not is_loading:
        _share_common_steps(optimizer_sd)
    state = {
        "model": model_sd,
        "optimizer": optimizer_sd,
        # One object per rank: every rank's RNG streams differ (tensor/expert-parallel seeds).
        "rng": ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0),
    }
    state.update(common)
    return state


def _common_step_holders(optimizer_sd: dict) -> list[dict | None]:
    """The `state` dict that holds `common_step` in each (chained) non-distributed optimizer's sharded
    state dict, None where there is none (the distributed optimizer keeps its step elsewhere)."""
    # ChainedOptimizer (chained_optim_avoid_prefix) keys its optimizers 0, 1, ...; a single one is bare.
    subs = (
        list(optimizer_sd.values())
        if optimizer_sd and all(isinstance(k, int) for k in optimizer_sd)
        else [optimizer_sd]
    )
    holders = []
    for sub in subs:
        inner = sub.get("optimizer", sub)  # Float16OptimizerWithFloat16Params nests torch's state dict
        state = inner.get("state") if isinstance(inner, dict) else None
        holders.append(state if isinstance(state, dict) else None)
    return holders


def _share_common_steps(optimizer_sd: dict) -> None:
    """Give every rank the Adam step of each of its optimizers (in place), so rank 0's common state, the
    only one dist_checkpointing saves, carries it for all ranks.

    Megatron saves the step (shared by all params) as `state["common_step"]` in the common, not sharded,
    part; it aligns param groups across ranks, so a rank with no param of an optimizer (a pipeline stage
    without experts, for the expert optimizer when ep > 1) has an empty state and no step. Saved from
    rank 0, the stages with experts would load their Adam moments without a step (KeyError 'step').
    """
    holders = _common_step_holders(optimizer_sd)
    steps = [None if h is None else h.get("common_step") for h in holders]
    gathered: list[list] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, [None if s is None else _to_cpu(s) for s in steps])
    for index, holder in enumerate(holders):
        if holder is None or "common_step" in holder:
            continue
        known = [rank_steps[index] for rank_steps in gathered if rank_steps[index] is not None]
        if known:
            holder["common_step"] = known[0]


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    *,
    model,
    optimizer,
    common: dict[str, Any],
    run_config: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint `iteration` atomically on every rank; return its final path.

    model: the bare (not DDP-wrapped) Megatron module of this rank. common: plain picklable values,
    identical on all ranks (iteration, scheduler state, data position...), stored once by rank 0.
    run_config: written as run_config.json (see `run_config`). keep_last: keep only the newest N
    finished checkpoints (0: all).
    """
    from megatron.core import dist_checkpointing

    def write(tmp: Path) -> None:
        state = _sharded_state(model, optimizer, is_loading=False, common={"iteration": iteration, **common})
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sync_save_strategy())

    return atomic_save(save_dir, iteration, write, run_config=run_config, keep_last=keep_last)


def atomic_save(
    save_dir: str | os.PathLike,
    iteration: int,
    write,
    *,
    run_config: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """The layout of the module docstring around `write(tmp)`, which every rank calls to fill `tmp`
    (Megatron's dist_checkpointing or DeepSpeed's engine); return the final path."""
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / (final.name + ".tmp")
    rank = torch.distributed.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of saves that were killed: never loaded, safe to drop. dist_checkpointing refuses a
        # non-empty directory, so a stale tmp of this iteration would also fail this save.
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()
    try:
        write(tmp)
    except BaseException:
        # `latest` still names the previous checkpoint; drop the partial one so no directory suggests a
        # checkpoint of this iteration exists. (Ranks that did not fail may still wait in a collective.)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=1, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # the same iteration saved again (e.g. after a resume): keep it until replaced
            stale = save_dir / (final.name + ".old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        pointer_tmp = save_dir / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        with open(pointer_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, save_dir / LATEST)
        _fsync_dir(save_dir)
        if keep_last:
            finished = sorted(p for p in save_dir.glob("iter_*") if p.is_dir() and p.suffix == "")
            for old in finished[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, load_rng: bool = True) -> dict[str, Any]:
    """Load `path` into model, optimizer and (with load_rng) this rank's RNG; return the common values
    saved with it. dist_checkpointing reshards model and optimizer to this run's layout; the per-rank RNG
    states cannot be, so a caller under another layout passes load_rng=False."""
    from megatron.core import dist_checkpointing

    common_keys = dist_checkpointing.load_common_state_dict(str(path))
    template = _sharded_state(model, optimizer, is_loading=True, common={})
    if not load_rng:
        del template["rng"]
    state = dist_checkpointing.load(template, str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        set_rng_state(state["rng"])
    return {k: v for k, v in common_keys.items() if k not in ("model", "optimizer", "rng")}
