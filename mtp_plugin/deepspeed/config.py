"""Checks of a whole experiment for backend=deepspeed, before any process group or model exists."""

from __future__ import annotations

from mtp_plugin.config import ExperimentConfig
from mtp_plugin.deepspeed.model import check_supported


def check_experiment(cfg: ExperimentConfig) -> None:
    """One-line ValueError naming the field for anything backend=deepspeed cannot train."""
    par, data = cfg.parallel, cfg.data
    if par.pipeline_layout is not None:
        raise ValueError(
            f"parallel.pipeline_layout={par.pipeline_layout!r} is a Megatron layout string; backend=deepspeed "
            "places layers from mtp.placement / mtp.mtp_stage: set it to null"
        )
    if par.sequence_parallel or par.context_parallel_size > 1:
        raise ValueError(
            "parallel.sequence_parallel / context_parallel_size > 1 are not supported by backend=deepspeed; "
            "use pipeline, data and expert parallel"
        )
    for name in ("reset_position_ids", "reset_attention_mask"):
        if getattr(data, name):
            raise ValueError(
                f"data.{name}=true (per-document attention) is not supported by backend=deepspeed (its "
                f"attention is plainly causal); set data.{name}=false or use backend=megatron"
            )
    check_supported(
        cfg.model,
        cfg.mtp,
        num_stages=par.pipeline_model_parallel_size,
        tensor_parallel=par.tensor_model_parallel_size,
        zero_stage=cfg.backend.zero_stage,
    )
