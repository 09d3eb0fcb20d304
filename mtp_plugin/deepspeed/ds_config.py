"""The DeepSpeed config (`ds_config`) of a run, generated from the plugin's config, a user JSON on top.

Generated: micro / global batch and gradient accumulation (from `training` and the data-parallel size),
ZeRO stage (`backend.zero_stage`, 1 by default: optimizer state sharded over data-parallel ranks; the
pipeline engine refuses 2 and 3), bf16 or fp32 (`backend.params_dtype`), gradient clipping
(`training.clip_grad`), AdamW with the plugin's betas, eps and weight decay. The learning rate follows the
plugin's schedule (the trainer sets it every step), so no DeepSpeed scheduler is configured.

A user's `backend.ds_config` JSON is merged over it (nested dicts key by key): anything the plugin does
not set (logging, communication buckets, activation checkpointing...) is taken as given; a value that
contradicts the plugin's config is a one-line ValueError naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtp_plugin.config import ExperimentConfig

# ds_config keys the plugin's config decides: (path in ds_config, the plugin field it comes from).
_DECIDED = (
    (("train_batch_size",), "training.global_batch_size"),
    (("train_micro_batch_size_per_gpu",), "training.micro_batch_size"),
    (("gradient_accumulation_steps",), "training.global_batch_size / (micro_batch_size x data parallel)"),
    (("zero_optimization", "stage"), "backend.zero_stage"),
    (("bf16", "enabled"), "backend.params_dtype"),
    (("fp16", "enabled"), "backend.params_dtype"),
    (("gradient_clipping",), "training.clip_grad"),
)


def generated_ds_config(cfg: ExperimentConfig, *, data_parallel_size: int) -> dict[str, Any]:
    tr, backend = cfg.training, cfg.backend
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.num_micro_batches(data_parallel_size),
        "zero_optimization": {"stage": backend.zero_stage},
        "bf16": {"enabled": backend.params_dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "gradient_clipping": tr.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tr.lr,
                "betas": [tr.adam_beta1, tr.adam_beta2],
                "eps": tr.adam_eps,
                "weight_decay": tr.weight_decay,
                # torch.optim.AdamW, not DeepSpeed's FusedAdam: that is a C++/CUDA op DeepSpeed JIT-compiles
                # on first use (minutes; a CUDA toolkit on GPU hosts) when its ops were not prebuilt.
                "torch_adam": True,
            },
        },
        # The plugin prints its own per-interval log line; DeepSpeed's would repeat it every step.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def load_user_ds_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"backend.ds_config={path} does not exist; point it at a DeepSpeed JSON config"
        )
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"backend.ds_config={path} is not valid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not isinstance(user, dict):
        raise ValueError(f"backend.ds_config={path} must hold a JSON object, got {type(user).__name__}")
    return user


def build_ds_config(
    cfg: ExperimentConfig, *, data_parallel_size: int, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's ds_config: generated, then `user` (default: the JSON at backend.ds_config) merged over it."""
    generated = generated_ds_config(cfg, data_parallel_size=data_parallel_size)
    if user is None:
        user = load_user_ds_config(cfg.backend.ds_config)
    source = cfg.backend.ds_config or "the user ds_config"
    for path, field in _DECIDED:
        given, ours = _get(user, path), _get(generated, path)
        if given is None or given == ours:
            continue
        # An explicit precision switch that agrees with params_dtype (e.g. fp16 off) is not a contradiction.
        raise ValueError(
            f"{source}: {'.'.join(path)}={given!r} contradicts {field} (= {ours!r} for this run); "
            f"remove it from the ds_config or change {field.split(' ')[0]}"
        )
    if "scheduler" in user:
        raise ValueError(
            f"{source}: a DeepSpeed 'scheduler' contradicts the plugin's lr schedule (training.lr, "
            "lr_warmup_iters, lr_decay_style, min_lr); remove it and set those fields"
        )
    return _merge(generated, user)
