"""The app's trained model from one of its checkpoints, on one device, for decoding."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp_plugin.config import ModelConfig, MTPConfig


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's run_config.json says about its model, read before anything is built."""

    path: Path
    model: ModelConfig
    mtp: MTPConfig
    eod_id: int


def read_checkpoint_info(directory: str | os.PathLike) -> CheckpointInfo:
    """The checkpoint `directory` names (a save_dir or one iter_* directory) and its model settings."""
    from mtp_plugin.train.checkpoint import finished_checkpoint, stored_run_config

    path = finished_checkpoint(directory)
    stored = stored_run_config(path)
    if stored is None:
        raise FileNotFoundError(
            f"{path} has no run_config.json (written by this app since it records the model settings); "
            "decode a checkpoint of a newer run"
        )
    return CheckpointInfo(
        path=path,
        model=ModelConfig(**stored["model"]),
        mtp=MTPConfig(**stored["mtp"]),
        eod_id=int(stored["data"]["eod_id"]),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_model(info: CheckpointInfo, *, dtype: torch.dtype, device: torch.device):
    """Build the checkpoint's MTPGPTModel on `device` (one process, no parallelism) and load its weights."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from mtp_plugin.config import ParallelConfig
    from mtp_plugin.megatron import build_mtp_gpt_model, transformer_config_from
    from mtp_plugin.train.checkpoint import load_model_weights

    if device.type == "cpu":
        from mtp_plugin.train.cpu import check_cpu_run, enable_megatron_on_cpu

        check_cpu_run(info.model)
        enable_megatron_on_cpu()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
        )
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=device.type == "cpu")
    config = transformer_config_from(info.model, ParallelConfig(), info.mtp, params_dtype=dtype)
    model = build_mtp_gpt_model(
        info.model, info.mtp, config, pre_process=True, post_process=True, eod_id=info.eod_id
    )
    model.to(device)
    load_model_weights(info.path, model=model)
    return model.eval()


def close() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
