"""The configured model built on the meta device, through the classes training uses, as a parameter table.

The whole model (every layer, every expert, the MTP depths) is built once with pipeline, tensor and
expert parallel sizes 1 in a one-process gloo group: `transformer_config_from` and
`build_mtp_gpt_model`, exactly as the training loop calls them, under `torch.device("meta")` with
Megatron's initialisation off, so no weight memory is allocated. `estimate.stage_params` then assigns each
parameter to the pipeline stages and GPUs Megatron would place it on. The token dispatcher is set to
allgather for the build (alltoall needs CUDA streams on a CPU host); it holds no parameters.
"""

from __future__ import annotations

import dataclasses

import torch

from mtp_plugin.config import ExperimentConfig, ParallelConfig
from mtp_plugin.plan.estimate import ParamRecord


def parameter_table(experiment: ExperimentConfig) -> list[ParamRecord]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from mtp_plugin.megatron.config import transformer_config_from
    from mtp_plugin.megatron.model import build_mtp_gpt_model

    if dist.is_initialized():
        raise RuntimeError(
            "the planner builds in its own one-process group; call it outside torch.distributed"
        )
    if not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    model_cfg = dataclasses.replace(experiment.model, moe_token_dispatcher_type="allgather")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        config = transformer_config_from(
            model_cfg,
            ParallelConfig(),
            experiment.mtp,
            params_dtype=torch.bfloat16 if experiment.backend.params_dtype == "bfloat16" else torch.float32,
            perform_initialization=False,
            # Megatron's GPU path allocates weights with an explicit CUDA device; the CPU path leaves the
            # device to torch's default, the meta device here, on a GPU host too.
            use_cpu_initialization=True,
        )
        with torch.device("meta"):
            model = build_mtp_gpt_model(
                model_cfg, experiment.mtp, config, pre_process=True, post_process=True
            )
        return [
            ParamRecord(
                name=name,
                numel=param.numel(),
                # Routed experts live under mlp.experts (Megatron's `allreduce` mark depends on ep > 1).
                expert=".mlp.experts." in name,
                tp_sharded=bool(getattr(param, "tensor_model_parallel", False)),
            )
            for name, param in model.named_parameters()
        ]
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
