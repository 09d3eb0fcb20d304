"""Megatron-LM's own training entry points on CPU, for the drop-in tests (megatron-core >= 0.17 wheels).

The model and optimizer come from Megatron-LM's `setup_model_and_optimizer` with the config container built
exactly as core_v0.19.0's `pretrain_gpt.py` builds it (`gpt_config_from_args` -> `pretrain_cfg_container_from_args`),
and each iteration is Megatron-LM's `train_step`. Only what a CPU needs is added here (test-only):
- `typing.override` on Python 3.11 (megatron.training uses the 3.12 decorator);
- the tests/megatron_cpu.py shims (CUDA queries answered by the CPU);
- model-parallel groups and the RNG tracker set up before/after `initialize_megatron`, which skips both
  when `torch.cuda.device_count() == 0`.
The native forward step mirrors core_v0.19.0 pretrain_gpt.py's `forward_step` / `loss_func` (that script is in
no wheel): model(tokens, position_ids, attention_mask, labels, loss_mask), masked sum, token count, report.
"""

from __future__ import annotations

import contextlib
import sys
import typing
from functools import partial

import torch

from mtp_plugin.megatron.lm_patch import BATCH_KEYS_V019
from mtp_plugin.train.cpu import CpuStream

if not hasattr(typing, "override"):  # Python 3.11: megatron.training imports the 3.12 decorator
    typing.override = lambda f: f


# Megatron-LM flags a CPU run without TE/apex needs (PLATFORM.md), plus a tiny deterministic model.
CPU_FLAGS = [
    "--transformer-impl",
    "local",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--use-cpu-initialization",
    "--distributed-backend",
    "gloo",
    "--clip-grad",
    "0",
]


def get_batch_from(microbatches):
    """A pretrain_gpt-style get_batch(data_iterator, vp_stage) that returns BATCH_KEYS order (core_v0.19)."""

    def get_batch(data_iterator, vp_stage=None):
        batch = next(data_iterator)
        return [batch.get(key) for key in BATCH_KEYS_V019]

    return get_batch


def native_forward_step(get_batch):
    """core_v0.19.0 pretrain_gpt.forward_step + loss_func, minus its timers and optional features."""

    def loss_func(loss_mask, output_tensor, model=None):
        losses = output_tensor.view(-1).float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * loss_mask)
        num_tokens = loss_mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    def forward_step(data_iterator, model, return_schedule_plan=False):
        (attention_mask, _, _, _, labels, _, loss_mask, _, position_ids, tokens) = get_batch(data_iterator)
        output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return output, partial(loss_func, loss_mask, model=model)

    return forward_step


def cpu_streams() -> None:
    """megatron.training's DDP wrapping opens a side CUDA stream; on CPU work is synchronous anyway."""
    torch.cuda.Stream = lambda *args, **kwargs: CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # The rerun state machine snapshots the CUDA RNG every step; a CPU run has none to save.
    torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None


def init_megatron_lm(flags: list[str], extra_args_provider=None):
    """parse_and_validate_args + initialize_megatron as pretrain() does, on CPU over gloo (one process)."""
    from megatron_cpu import install_cpu_shims

    install_cpu_shims()
    cpu_streams()
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.initialize import initialize_megatron

    sys.argv = ["pretrain_gpt.py", *flags, *CPU_FLAGS]
    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults={})
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    initialize_megatron(allow_no_cuda=True)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed, inference_rng_tracker=True)
    return args


def rng_state():
    from megatron.core import tensor_parallel

    return torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_state(state) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state[0])
    tensor_parallel.get_cuda_rng_tracker().set_states(state[1])


def setup_from_config(args, model_cfg):
    """Megatron-LM's setup_model_and_optimizer on the config container core_v0.19.0's pretrain_gpt builds."""
    from megatron.core.enums import ModelType
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import setup_model_and_optimizer

    container = pretrain_cfg_container_from_args(args, model_cfg)
    return setup_model_and_optimizer(
        ModelType.encoder_or_decoder,
        cfg_container=container,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def train_steps(forward_step, microbatch_groups, model, optimizer, scheduler, *, on_step=None):
    """Megatron-LM's train_step once per group of micro-batches; returns the loss dicts (floats)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.core.utils import get_model_config
    from megatron.training.training import train_step

    config = get_model_config(model[0])
    results = []
    for iteration, group in enumerate(microbatch_groups, start=1):
        out = train_step(
            forward_step, RerunDataIterator(iter(group)), model, optimizer, scheduler, config, get_forward_backward_func(),
            iteration=iteration,
        )  # fmt: skip
        loss_dict, grad_norm = out[0], out[5]
        results.append({k: float(v) for k, v in loss_dict.items()} | {"grad norm": grad_norm})
        if on_step is not None:
            on_step(iteration)
    return results
