"""Pipeline placement of the MTP depths (DESIGN.md §5), planned and validated before any process group.

Depth k consumes h^{k-1}, so every depth runs after the trunk's last decoder layer, all on one stage.
The plan is expressed as a Megatron-Core `pipeline_model_parallel_layout` string (`E` embedding, `t`
decoder layer, `m` MTP depth, `L` head + loss, `|` between stages), which Megatron then uses to build
the right layers per stage and to carry the (1 + D)-times longer hidden states between stages.

What Megatron-Core's native MTP supports and what the plugin adds is written in docs/placement.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

_TOKEN = re.compile(r"([EtmL])(?:\*(\d+))?")
_GROUP = re.compile(r"\(([^()]+)\)\*(\d+)")


@dataclass(frozen=True)
class PipelinePlan:
    """Which stage holds what. `layout` is None when Megatron's default split already does it."""

    stages: tuple[str, ...]  # one string of E/t/m/L per stage
    layout: str | None
    mtp_stage: int | None

    @property
    def embedding_stages(self) -> tuple[int, ...]:
        """Stages that need the word embedding table: stage 0 and the MTP stage."""
        stages = {0}
        if self.mtp_stage is not None:
            stages.add(self.mtp_stage)
        return tuple(sorted(stages))

    def embedding_ranks_fn(self, *, tied_head: bool):
        """A `get_embedding_ranks` for `initialize_model_parallel`: every stage holding a copy of the table.

        With a tied head the last stage's output layer is one more copy.
        """
        stages = set(self.embedding_stages)
        if tied_head:
            stages.add(len(self.stages) - 1)
        # A partial of a module-level function pickles, so spawned workers can receive it.
        return partial(_ranks_of_stages, stages=tuple(sorted(stages)))


def _ranks_of_stages(pp_ranks, *_, stages: tuple[int, ...]):
    return [pp_ranks[i] for i in stages]


def parse_layout(layout: str) -> tuple[str, ...]:
    """'Et*2|t*2m|L' -> ('Ett', 'ttm', 'L'); Megatron's grammar: `X*n`, `(...)*n` groups (which may hold
    `|`, e.g. 'Et*4|(t*4|)*14,tmL'), and cosmetic commas."""
    text = layout.replace(" ", "").replace(",", "")
    while _GROUP.search(text):
        text = _GROUP.sub(lambda m: m.group(1) * int(m.group(2)), text)
    stages = []
    for part in text.split("|"):
        pos, expanded = 0, []
        while pos < len(part):
            match = _TOKEN.match(part, pos)
            if match is None:
                raise ValueError(
                    f"pipeline layout {layout!r}: cannot read {part[pos:]!r}; use E, t, m, L with optional *N, "
                    "stages separated by |"
                )
            expanded.append(match.group(1) * int(match.group(2) or 1))
            pos = match.end()
        stages.append("".join(expanded))
    return tuple(stages)


def _check_stages(
    stages: tuple[str, ...], *, num_layers: int, num_depths: int, pipeline_size: int
) -> int | None:
    flat = "".join(stages)
    fix = "; write one stage per pipeline rank, e.g. 'Et*2|t*2m|L'"
    if len(stages) != pipeline_size:
        raise ValueError(
            f"pipeline layout has {len(stages)} stages but pipeline_model_parallel_size={pipeline_size}{fix}"
        )
    if not flat.startswith("E") or flat.count("E") != 1:
        raise ValueError("pipeline layout must start with the embedding 'E' on stage 0, exactly once" + fix)
    if not flat.endswith("L") or flat.count("L") != 1:
        raise ValueError("pipeline layout must end with the loss 'L' on the last stage, exactly once" + fix)
    if flat.count("t") != num_layers:
        raise ValueError(
            f"pipeline layout has {flat.count('t')} decoder layers 't' but model.num_layers={num_layers}"
        )
    if flat.count("m") != num_depths:
        raise ValueError(
            f"pipeline layout has {flat.count('m')} MTP depths 'm' but mtp.num_depths={num_depths}"
        )
    for i, stage in enumerate(stages):
        if not stage:
            raise ValueError(f"pipeline stage {i} has no work (no layer, MTP depth, embedding or loss){fix}")
    mtp_stages = [i for i, stage in enumerate(stages) if "m" in stage]
    if len(mtp_stages) > 1:
        raise ValueError(
            f"all MTP depths must be on one stage (depth k needs h^(k-1)); layout puts them on {mtp_stages}"
        )
    if not mtp_stages:
        return None
    s = mtp_stages[0]
    if s == 0:
        raise ValueError(
            "MTP cannot run on stage 0: it runs after the trunk's last layer; move the 'm's to a stage >= 1"
        )
    if "t" in flat[flat.index("m") :]:
        raise ValueError(
            f"MTP stage {s} comes before the trunk's last decoder layer: depth 1 consumes the trunk output h^0, "
            "so put every 't' before the 'm's"
        )
    return s


def plan_pipeline(
    *,
    num_layers: int,
    num_depths: int,
    pipeline_size: int,
    placement: str = "last",
    mtp_stage: int | None = None,
    layout: str | None = None,
) -> PipelinePlan:
    """Validate a placement and turn it into a per-stage plan (pure: no Megatron import, no process group)."""
    if layout:
        stages = parse_layout(layout)
        s = _check_stages(stages, num_layers=num_layers, num_depths=num_depths, pipeline_size=pipeline_size)
        return PipelinePlan(stages=stages, layout=layout, mtp_stage=s)
    last = pipeline_size - 1
    if placement not in ("last", "stage"):
        raise ValueError(f"mtp.placement={placement!r} is unknown; use 'last' or 'stage'")
    if placement == "last" or mtp_stage == last:
        # MTP, head and loss on the last stage: Megatron's default split, no layout needed.
        stages = _trunk_stages(num_layers, pipeline_size, "pipeline stages")
        stages = stages[:-1] + (stages[-1] + "m" * num_depths + "L",)
        return PipelinePlan(stages=stages, layout=None, mtp_stage=last if num_depths else None)
    if mtp_stage is None or not 1 <= mtp_stage < pipeline_size:
        raise ValueError(
            f"mtp.mtp_stage={mtp_stage} is not a valid stage: the pipeline has stages 0..{last} and MTP cannot "
            f"run on stage 0; use a stage in 1..{last}"
        )
    if mtp_stage < last - 1:
        raise ValueError(
            f"mtp.mtp_stage={mtp_stage} would leave stages {mtp_stage + 1}..{last - 1} without work (only the last "
            f"stage carries the head and loss after MTP); use mtp_stage={last - 1} or {last}"
        )
    stages = _trunk_stages(num_layers, mtp_stage + 1, "stages before the loss stage")
    stages = stages[:-1] + (stages[-1] + "m" * num_depths, "L")
    return PipelinePlan(stages=stages, layout="|".join(stages), mtp_stage=mtp_stage)


def _trunk_stages(num_layers: int, num_stages: int, what: str) -> tuple[str, ...]:
    """The trunk's layers split evenly over `num_stages` stages, the embedding on the first."""
    if num_layers % num_stages:
        raise ValueError(
            f"model.num_layers={num_layers} is not divisible across {num_stages} {what}; change num_layers or "
            "pipeline_model_parallel_size, or give an explicit parallel.pipeline_layout"
        )
    per = num_layers // num_stages
    return tuple(("E" if i == 0 else "") + "t" * per for i in range(num_stages))
