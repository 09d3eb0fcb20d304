"""Atomic checkpoints through `megatron.core.dist_checkpointing`.

Layout under `save_dir`:

    iter_0000020/        a finished checkpoint (dist_checkpointing: model, optimizer, per-rank RNG,
                         and in its common part the scheduler, data position, λ schedule, tokens, the
                         rank layout); run_config.json beside them: the model, MTP and data settings a
                         resume must match (checked before any model is built)
                         file_sizes.json (written last): the size of every file, checked at launch
    iter_0000030.tmp/    a checkpoint being written; never read
    latest               the name of the newest finished checkpoint ("iter_0000020")

Before writing, rank 0 checks the free space against the save's estimated size (the newest finished
checkpoint's, or the parameters' with Adam's state); a save that does not fit, or whose write fails (no
space, I/O error, permission), raises CheckpointWriteError on every rank with one line, the partial
directory removed and `latest` untouched.

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
import math
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
# Written last into a finished checkpoint: {"files": {relative path: size in bytes}} of every file before it,
# so a truncated or missing shard is found at launch (mtp_plugin.train.hydra_app.check_checkpoint).
FILE_SIZES = "file_sizes.json"


class CheckpointWriteError(RuntimeError):
    """A save that could not be written (no space, an I/O or permission error): raised on every rank with
    one line naming the directory and the cause; the partial checkpoint is removed, `latest` untouched."""


def estimate_bytes(params) -> int:
    """Bytes a checkpoint of `params` (this rank's parameters) takes: the weights as stored, and the
    optimizer's fp32 main copy and Adam's two fp32 moments (Megatron's optimizer state holds the main
    copy even for fp32 weights: 16.1 bytes per parameter in a toy fp32 checkpoint)."""
    return sum(p.numel() * (p.element_size() + 12) for p in params)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files of a finished checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _causes(err: BaseException):
    """`err`, its causes and contexts, and the per-rank failures a torch.distributed.checkpoint
    CheckpointException wraps, depth first."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [e.__cause__, e.__context__]


def _write_failure(err: BaseException, save_dir: Path) -> str:
    """The cause of a failed write in words: the OSError's (ENOSPC, EIO, EACCES...) if there is one in the
    chain; a full file system when it is full now (torch's zip writer reports a short write as
    `RuntimeError: ... unexpected pos`); else the exception's first line."""
    for e in _causes(err):
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror} (errno {e.errno})"
    free = shutil.disk_usage(save_dir).free
    if free < 1 << 20:
        return f"no space left on the device ({free:,} bytes free after the failed write)"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def record_file_sizes(directory: Path) -> None:
    """Write FILE_SIZES into `directory` (a checkpoint whose files are all written)."""
    sizes = {
        str(f.relative_to(directory)): f.stat().st_size
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != FILE_SIZES
    }
    (directory / FILE_SIZES).write_text(json.dumps({"files": sizes}, indent=1) + "\n")


def check_file_sizes(path: str | os.PathLike) -> None:
    """ValueError in one line, naming the file and the checkpoint before it, if a file of checkpoint `path`
    is not the size it was saved with (see `file_size_problem`)."""
    path = Path(path)
    problem = file_size_problem(path)
    if problem:
        earlier = sorted(
            p.name for p in path.parent.glob("iter_*") if p.is_dir() and p.suffix == "" and p.name < path.name
        )
        previous = (
            f"{earlier[-1]} is the newest before it"
            if earlier
            else "there is none before it; remove it to start fresh"
        )
        raise ValueError(
            f"{problem}; the checkpoint is damaged: point {path.parent / LATEST} at the previous iter_* "
            f"directory ({previous})"
        )


def file_size_problem(path: str | os.PathLike) -> str | None:
    """'<file> is N bytes, M when saved' (or 'is missing') for the first file of checkpoint `path` that
    differs from its FILE_SIZES record; None when all match or the checkpoint predates the record."""
    path = Path(path)
    record = path / FILE_SIZES
    if not record.is_file():
        return None
    try:
        sizes = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{record} is unreadable"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing ({size:,} bytes when saved)"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size:,} bytes, {size:,} when saved (truncated or damaged)"
    return None


# Beside the groups in run_config.json: the run's length in tokens (train_iters x global batch x sequence),
# against which a run-relative λ switch (mtp=deepseek_v3_scaled: 2/3 of the run) is recognised on resume.
RUN_TOKENS = "run_tokens"
LAMBDA_TOKEN_FIELDS = ("boundaries_tokens", "start_tokens", "end_tokens")
# Set in the common state of a checkpoint holding model weights only (`python -m mtp_plugin.convert import`):
# a run loading it starts at iteration 0 with a fresh optimizer, scheduler and RNG from its own seed.
WEIGHTS_ONLY = "weights_only"


def run_config(cfg) -> dict[str, Any]:
    """The model, MTP and data settings of an ExperimentConfig, as JSON values, and its run length."""
    from dataclasses import asdict

    groups = {name: asdict(getattr(cfg, name)) for name in RUN_CONFIG_GROUPS}
    for field in RESUMABLE_DATA_FIELDS:
        groups["data"].pop(field, None)
    groups[RUN_TOKENS] = cfg.training.train_iters * cfg.tokens_per_iteration
    return json.loads(json.dumps(groups))


def _scaled(old: Any, new: Any, ratio: float) -> bool:
    """Whether `new` is `old` (a token position or a list of them) times `ratio`."""
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_scaled(a, b, ratio) for a, b in zip(old, new))
    if isinstance(old, int | float) and isinstance(new, int | float):
        return math.isclose(old * ratio, new, rel_tol=1e-9, abs_tol=1e-9)
    return False


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def run_config_differences(path: str | os.PathLike, current: dict[str, Any]) -> list[str]:
    """ "mtp.num_depths=2 vs 1" for each setting where checkpoint `path` and `current` (`run_config`)
    differ ([] if none, or if the checkpoint predates run_config.json). λ switch points that moved with the
    run's length (scaled by the same factor as its tokens: a longer train_iters of a run-relative switch)
    are no difference; the trainer re-derives them on resume as it re-derives the lr schedule."""
    stored_path = Path(path) / RUN_CONFIG
    if not stored_path.is_file():
        return []
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{stored_path} is unreadable ({err}); remove that checkpoint or fix the file"
        ) from None
    old_tokens, new_tokens = stored.pop(RUN_TOKENS, None), current.get(RUN_TOKENS)
    old = _flatten(stored, "")
    new = _flatten({k: v for k, v in current.items() if k != RUN_TOKENS}, "")
    ratio = new_tokens / old_tokens if old_tokens and new_tokens else None
    return [
        f"{key}={old.get(key, '(absent)')} vs {new.get(key, '(absent)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
        and key not in RESUMABLE_MTP_KEYS
        and not (ratio and lambda_token_field(key) and _scaled(old.get(key), new.get(key), ratio))
    ]


def lambda_token_field(key: str) -> bool:
    """Whether dotted `key` is a λ switch point (a run-relative one follows the run's length on resume)."""
    return key.startswith("mtp.lambda_schedule.") and key.rsplit(".", 1)[1] in LAMBDA_TOKEN_FIELDS


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


def sharded_metadata() -> dict[str, Any]:
    """What Megatron-LM's checkpointing passes to `sharded_state_dict` (_build_sharded_state_dict_metadata):
    the group over which replicated tensors are deduplicated, and the current (prefix-free)
    chained-optimizer key format."""
    from megatron.core import parallel_state as ps

    return {
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def _sharded_state(model, optimizer, *, is_loading: bool, common: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    metadata = sharded_metadata()
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

    from megatron.core import parallel_state as ps

    # Replicas of the same weights on other data-parallel ranks are written once.
    share = estimate_bytes(model.parameters()) // ps.get_data_parallel_world_size()
    return atomic_save(
        save_dir, iteration, write, run_config=run_config, keep_last=keep_last, estimated_bytes=share
    )


def atomic_save(
    save_dir: str | os.PathLike,
    iteration: int,
    write,
    *,
    run_config: dict[str, Any] | None = None,
    keep_last: int = 0,
    estimated_bytes: int = 0,
) -> Path:
    """The layout of the module docstring around `write(tmp)`, which every rank calls to fill `tmp`
    (Megatron's dist_checkpointing or DeepSpeed's engine); return the final path.

    estimated_bytes: this rank's share of the checkpoint (`estimate_bytes`); with the size of the newest
    finished checkpoint, when larger, it is checked against the free space before anything is written.
    A save that does not fit, or whose write fails, raises CheckpointWriteError on every rank."""
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / (final.name + ".tmp")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    rank = torch.distributed.get_rank()
    problem = ""
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of saves that were killed: never loaded, safe to drop. dist_checkpointing refuses a
        # non-empty directory, so a stale tmp of this iteration would also fail this save.
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale)
    needed = int(_agreed_sum(estimated_bytes))
    if rank == 0:
        previous = latest_checkpoint_or_none(save_dir)
        if previous is not None:
            needed = max(needed, checkpoint_bytes(previous))
        free = shutil.disk_usage(save_dir).free
        if needed > free:
            problem = (
                f"not enough space in {save_dir} for checkpoint {final.name}: it needs about {needed:,} bytes, "
                f"{free:,} are free; free space or point training.save_dir elsewhere; nothing was written"
            )
        else:
            tmp.mkdir()
    _raise_on_every_rank(problem, previous_note(save_dir) if rank == 0 else "")
    failure = ""
    try:
        write(tmp)
    except (Exception, CheckpointException) as err:
        failure = f"writing checkpoint {final.name} in {save_dir} failed: {_write_failure(err, save_dir)}"
    except BaseException:  # a second exit signal: leave at once, as before
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _agreed_flag(bool(failure)):
        # `latest` still names the previous checkpoint; drop the partial one so no directory suggests a
        # checkpoint of this iteration exists.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if torch.distributed.get_world_size() > 1:  # every rank names the first failing rank's cause
            failures: list[str] = [""] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(failures, failure)
            failure = next(f for f in failures if f)
        _raise_on_every_rank(failure, previous_note(save_dir) if rank == 0 else "", removed=True)
    published = ""
    if rank == 0:
        try:
            _publish(tmp, final, run_config=run_config, keep_last=keep_last)
        except OSError as err:  # the disk filled up between the shards and the small files, say
            published = (
                f"writing checkpoint {final.name} in {save_dir} failed: {_write_failure(err, save_dir)}"
            )
            if latest_checkpoint_or_none(save_dir) != final:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
    if _agreed_flag(bool(published)):
        _raise_on_every_rank(published, previous_note(save_dir) if rank == 0 else "", removed=True)
    return final


def _publish(tmp: Path, final: Path, *, run_config: dict[str, Any] | None, keep_last: int) -> None:
    """Rank 0, every rank's files written into `tmp`: the small files, then `tmp` -> `final` and `latest`."""
    save_dir = final.parent
    if run_config is not None:
        (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=1, sort_keys=True) + "\n")
    record_file_sizes(tmp)
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


def latest_checkpoint_or_none(directory: str | os.PathLike) -> Path | None:
    """`latest_checkpoint`, or None where `latest` names nothing usable."""
    try:
        return latest_checkpoint(directory)
    except (OSError, ValueError):
        return None


def previous_note(save_dir: str | os.PathLike) -> str:
    """Where a run whose save failed can resume from."""
    previous = latest_checkpoint_or_none(save_dir)
    if previous is None:
        return f"no earlier checkpoint in {save_dir}"
    return f"{Path(save_dir) / LATEST} still names {previous.name} (rerun to resume from it)"


def _agreed_sum(value: float) -> float:
    """`value` summed over every rank (itself on one process)."""
    if torch.distributed.get_world_size() == 1:
        return value
    # Made on the run's device: NCCL takes no CPU tensor (tests/device_checks.py guards it on CPU too).
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item()


def _agreed_flag(flag: bool) -> bool:
    """Whether `flag` holds on any rank."""
    return _agreed_sum(float(flag)) > 0


def _raise_on_every_rank(problem: str, note: str, *, removed: bool = False) -> None:
    """Rank 0's `problem` (or a rank's own) raised as CheckpointWriteError on every rank; '' goes on."""
    message = [problem, note]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(message, src=0)
        if not message[0] and problem:  # this rank failed where rank 0 did not
            message = [problem, ""]
    if message[0]:
        detail = "; the partial checkpoint was removed" if removed else ""
        raise CheckpointWriteError(
            f"{message[0]}{detail}; {message[1]}" if message[1] else message[0] + detail
        )


# Per-param-group schedule settings Megatron keeps in each group (the scheduler prefers them to its own),
# and the fields that tell the groups apart (megatron.core.optimizer's param_group_identifier_keys less these).
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
GROUP_IDENTITY_KEYS = ("optimizer", "wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _follow_current_schedule(loaded: Any, current_groups: list[dict]) -> None:
    """Give the loaded optimizer state's param groups (in place) this run's SCHEDULE_GROUP_KEYS, from the
    current group they correspond to. A resume follows this run's lr settings: restored as saved, a
    group's max_lr would drive the schedule whatever training.lr says (megatron-core 0.16), and 0.19 pairs
    saved and current groups by these values, refusing to load when training.lr changed."""

    def identity(group: dict) -> tuple:
        return tuple(group.get(key) for key in GROUP_IDENTITY_KEYS)

    current = {identity(g): g for g in current_groups}
    if isinstance(loaded, dict):
        for key, value in loaded.items():
            if key == "param_groups" and isinstance(value, list):
                for group in value:
                    mine = current.get(identity(group))
                    if mine is not None:
                        group.update({k: mine[k] for k in SCHEDULE_GROUP_KEYS if k in mine})
            else:
                _follow_current_schedule(value, current_groups)


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, load_rng: bool = True) -> dict[str, Any]:
    """Load `path` into model, optimizer and (with load_rng) this rank's RNG; return the common values
    saved with it (a `WEIGHTS_ONLY` checkpoint: the model alone). dist_checkpointing reshards model and optimizer to this run's layout; the per-rank RNG
    states cannot be, so a caller under another layout passes load_rng=False."""
    from megatron.core import dist_checkpointing

    common_keys = dist_checkpointing.load_common_state_dict(str(path))
    if common_keys.get(WEIGHTS_ONLY):
        state = dist_checkpointing.load(
            {"model": model.sharded_state_dict(metadata=sharded_metadata())}, str(path)
        )
        model.load_state_dict(state["model"])
        return {k: v for k, v in common_keys.items() if k != "model"}
    template = _sharded_state(model, optimizer, is_loading=True, common={})
    if not load_rng:
        del template["rng"]
    state = dist_checkpointing.load(template, str(path))
    model.load_state_dict(state["model"])
    _follow_current_schedule(state["optimizer"], optimizer.param_groups)
    optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        set_rng_state(state["rng"])
    return {k: v for k, v in common_keys.items() if k not in ("model", "optimizer", "rng")}


def finished_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: a save_dir (its `latest`) or one finished iter_* directory."""
    path = Path(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    if (path / "metadata.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path} is no checkpoint of this app (neither a save_dir holding `{LATEST}` nor an iter_* directory "
        "with metadata.json); point it at a trained run's checkpoints"
    )


def stored_run_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run_config.json a checkpoint was written with (None before they were stored)."""
    stored = Path(path) / RUN_CONFIG
    return json.loads(stored.read_text()) if stored.is_file() else None


def load_model_weights(path: str | os.PathLike, *, model) -> None:
    """Only the model's weights from checkpoint `path` (resharded to this run's layout); the optimizer,
    RNG and data position stay this run's own: a run that starts from a trained model."""
    from megatron.core import dist_checkpointing

    template = {"model": model.sharded_state_dict(metadata=sharded_metadata())}
    state = dist_checkpointing.load(template, str(path))
    model.load_state_dict(state["model"])
