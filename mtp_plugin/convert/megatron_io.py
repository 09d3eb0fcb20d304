"""The app's checkpoints, read and written layout-independently.

Reading: a Megatron backend checkpoint (`mtp_plugin.train.checkpoint`) is a torch.distributed.checkpoint
directory whose keys are Megatron's global sharded keys, each with its full (unsharded) shape whatever
tp / pp / ep layout wrote it. `MegatronCheckpoint.read(keys)` loads just those keys, whole, in this one
process (torch's no-process-group load reads only the byte ranges they need), so the export streams one
layer at a time and every layout gives the same tensors.

Writing (import): the run's model is built on one process (tp = pp = ep = 1) by the plugin's own builder
with the run's seed, its `sharded_state_dict()` is filled from the global tensors (depths the source lacks
keep that initialisation), and the result is saved with the app's own atomic checkpoint code as a
weights-only checkpoint (no optimizer or RNG state) that `training.load_dir` starts a run from.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mtp_plugin.config import ExperimentConfig, ModelConfig
from mtp_plugin.train import checkpoint as ckpt


class CheckpointError(ValueError):
    """The checkpoint cannot be read as asked (the message says what to change)."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """An iter_* checkpoint directory, or a save_dir whose `latest` names one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint {path} is not a directory; pass an iter_* checkpoint or its save_dir"
        )
    if (path / ckpt.LATEST).is_file():
        try:
            found = ckpt.latest_checkpoint(path)
        except FileNotFoundError as err:
            raise CheckpointError(str(err)) from None
        assert found is not None
        path = found
    if (path / ckpt.DEEPSPEED_MARKER).is_file() or (path / "metadata.json").is_file():
        return path
    raise CheckpointError(
        f"{path} is not a finished checkpoint of the app (no metadata.json, no {ckpt.DEEPSPEED_MARKER}, no "
        f"{ckpt.LATEST}); pass an iter_* directory or a training.save_dir"
    )


def run_config_of(path: Path) -> dict:
    """The run_config.json the app wrote beside the checkpoint (model, mtp, data)."""
    file = path / ckpt.RUN_CONFIG
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is missing or unreadable ({err.__class__.__name__}); the export needs the run's model "
            "settings, which the app writes there with every checkpoint"
        ) from None


def model_of(run_config: dict) -> ModelConfig:
    return ModelConfig(**run_config["model"])


def num_depths_of(run_config: dict) -> int:
    return int(run_config["mtp"]["num_depths"])


class MegatronCheckpoint:
    """Whole tensors of a Megatron backend checkpoint, by global key."""

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as err:  # torch raises several types for a damaged .metadata file
            raise CheckpointError(
                f"{path}: unreadable dist_checkpointing metadata ({err}); pick another checkpoint"
            ) from None
        self.shapes = {
            key: (meta.size, meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import FileSystemReader, load

        state = {}
        for key in keys:
            size, dtype = self.shapes[key]
            state[key] = torch.empty(size, dtype=dtype)
        with warnings.catch_warnings():
            # "torch.distributed is disabled ...: assuming ... a single process": exactly the intent.
            warnings.simplefilter("ignore", UserWarning)
            load(state, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        return state


@contextlib.contextmanager
def single_process_model(cfg: ExperimentConfig):
    """The run's model (`MTPGPTModel`) built on one process (tp = pp = ep = 1) with the run's seed, as the
    app's Trainer builds it; torch.distributed and Megatron's parallel state are set up for it and torn
    down after (unless a process group already existed)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from mtp_plugin.config import ParallelConfig
    from mtp_plugin.megatron.config import transformer_config_from
    from mtp_plugin.megatron.model import build_mtp_gpt_model

    if not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    try:
        ps.initialize_model_parallel()
        torch.manual_seed(cfg.training.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(
            cfg.training.seed, inference_rng_tracker=not torch.cuda.is_available()
        )
        params_dtype = getattr(torch, cfg.backend.params_dtype)
        config = transformer_config_from(cfg.model, ParallelConfig(), cfg.mtp, params_dtype=params_dtype)
        yield build_mtp_gpt_model(
            cfg.model, cfg.mtp, config, pre_process=True, post_process=True, eod_id=cfg.data.eod_id
        )
    finally:
        ps.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()


def load_weights(model, path: str | os.PathLike) -> None:
    """Load the model tensors of checkpoint `path` (any layout, weights-only or full) into `model`."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(
        {"model": model.sharded_state_dict(metadata=ckpt.sharded_metadata())}, str(path)
    )
    model.load_state_dict(state["model"])


def write_weights_only(
    cfg: ExperimentConfig,
    out: Path,
    tensor_for: Callable[[str], torch.Tensor | None],
) -> int:
    """Build `cfg`'s model on one process, set every tensor `tensor_for(global key)` returns (None keeps
    the run's initialisation), save it under `out` as iteration 0; return how many tensors were set."""
    with single_process_model(cfg) as model:
        set_count = 0
        with torch.no_grad():
            for key, sharded in _sharded_tensors(model.sharded_state_dict(metadata=ckpt.sharded_metadata())):
                value = tensor_for(key)
                if value is None:
                    continue
                if tuple(value.shape) != tuple(sharded.global_shape):
                    raise CheckpointError(
                        f"the source's tensors for {key} have shape {tuple(value.shape)}, the run's model "
                        f"{tuple(sharded.global_shape)}; the checkpoint does not match its config.json"
                    )
                local = value[tuple(slice(o, o + n) for o, n in _offsets(sharded, value.dim()))]
                sharded.data.copy_(local.reshape(sharded.data.shape))
                set_count += 1

        def write(tmp: Path) -> None:
            from megatron.core import dist_checkpointing

            state = {
                "model": model.sharded_state_dict(metadata=ckpt.sharded_metadata()),
                "iteration": 0,
                ckpt.WEIGHTS_ONLY: True,
            }
            dist_checkpointing.save(state, str(tmp), sharded_strategy=ckpt.sync_save_strategy())

        ckpt.atomic_save(out, 0, write, run_config=ckpt.run_config(cfg))
        return set_count


def _sharded_tensors(state: dict):
    """(key, ShardedTensor) for every tensor of a model's sharded state dict (factories built)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stack = list(state.values())
    while stack:
        item = stack.pop()
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            stack.extend(
                built.values() if isinstance(built, dict) else built if isinstance(built, list) else [built]
            )
        elif isinstance(item, ShardedTensor):
            yield item.key, item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _offsets(sharded, ndim: int) -> list[tuple[int, int]]:
    """(offset, length) along each global dim of the part of the global tensor `sharded` holds."""
    prepend = sharded.prepend_axis_num
    local = list(sharded.local_shape)
    out = []
    for dim in range(ndim):
        offset = sharded.global_offset[dim]
        length = 1 if dim < prepend else local[dim - prepend]
        out.append((offset, length))
    return out
