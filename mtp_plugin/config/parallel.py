"""Parallel layout: the schema Hydra's `parallel/` group fills."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron-style model parallel sizes; data parallel is what is left of the world size.

    Expert parallel ranks are carved out of data parallel x context parallel, as in Megatron-Core.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Megatron `pipeline_model_parallel_layout` string (e.g. "Et*2|t*2m|L"); None plans it from mtp.placement.
    pipeline_layout: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
            "context_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "parallel.sequence_parallel needs tensor_model_parallel_size > 1; set it to false"
            )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """Checks that the sizes fit `world_size` and returns the data-parallel size."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor ({self.tensor_model_parallel_size}) x pipeline "
                f"({self.pipeline_model_parallel_size}) x context ({self.context_parallel_size}) parallel = "
                f"{self.model_parallel_size}; change the parallel sizes or the number of processes"
            )
        dp = world_size // self.model_parallel_size
        if (dp * self.context_parallel_size) % self.expert_model_parallel_size:
            raise ValueError(
                f"expert_model_parallel_size={self.expert_model_parallel_size} must divide data x context parallel "
                f"= {dp * self.context_parallel_size} at world size {world_size}"
            )
        return dp
