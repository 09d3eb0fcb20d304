"""Parallel layout: the schema Hydra's `parallel/` group fills."""

from __future__ import annotations

from dataclasses import dataclass, field

RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm", "mla_up_proj", "shared_experts")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron-style model parallel sizes; data parallel is what is left of the world size.

    Expert parallel ranks are carved out of data parallel x context parallel, as in Megatron-Core.

    Activation recompute (Megatron's TransformerConfig fields of the same names, trunk layers only):
    recompute_granularity null | "full" (whole layers: recompute_method "uniform" groups of / "block"
    the first recompute_num_layers layers of each stage) | "selective" (recompute_modules of each
    layer, from RECOMPUTE_MODULES; Megatron's default is core_attn).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Megatron `pipeline_model_parallel_layout` string (e.g. "Et*2|t*2m|L"); None plans it from mtp.placement.
    pipeline_layout: str | None = None
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] = field(default_factory=list)

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
        self._check_recompute()

    def _check_recompute(self) -> None:
        granularity = self.recompute_granularity
        if granularity not in (None, "full", "selective"):
            raise ValueError(f"parallel.recompute_granularity={granularity!r}; use full, selective or null")
        if granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise ValueError(
                    f"parallel.recompute_method={self.recompute_method!r} with recompute_granularity=full; "
                    "use uniform or block"
                )
            if self.recompute_num_layers is None or self.recompute_num_layers < 1:
                raise ValueError(
                    "parallel.recompute_num_layers must be >= 1 with recompute_granularity=full "
                    f"(got {self.recompute_num_layers}); e.g. 1 with recompute_method=uniform recomputes every layer"
                )
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError(
                "parallel.recompute_method / recompute_num_layers apply to recompute_granularity=full only; "
                "set them to null"
            )
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ValueError(
                f"parallel.recompute_modules: unknown {unknown}; choose from {list(RECOMPUTE_MODULES)}"
            )
        if self.recompute_modules and granularity != "selective":
            raise ValueError(
                "parallel.recompute_modules needs recompute_granularity=selective; set it or clear the modules"
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
