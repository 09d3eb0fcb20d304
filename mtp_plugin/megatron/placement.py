"""Pipeline placement of the MTP depths (DESIGN.md §5), planned and validated before any process group.

Depth k consumes h^{k-1}, so every depth runs after the trunk's last decoder layer: all on one stage
(`last`, `stage`), or split over consecutive stages (`split`: depth 1 on stage s_1, depth 2 on s_2 >= s_1,
...), each stage handing `[h^0; ...; h^k]` on to the next. The plan is expressed as a Megatron-Core
`pipeline_model_parallel_layout` string (`E` embedding, `t` decoder layer, `m` MTP depth, `L` head + loss,
`|` between stages), which Megatron then uses to build the right layers per stage and to carry the longer
hidden states between stages.

Megatron-Core asserts that all `m` sit on one stage (`validate_layer_layout`), so a split plan hands
Megatron `megatron_layout`: the same trunk, with every `m` on the first depth stage. That layout puts
MTP before the last stage, which makes Megatron exchange tensor shapes between stages (its
`mtp_standalone` mode) as the split's growing hidden states need; which depths each stage builds and
runs is the plugin's (`PipelinePlan.depths_on`, passed to `MTPGPTModel`).

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
    mtp_stage: int | None  # the (first) stage running MTP depths

    @property
    def depth_stages(self) -> tuple[int, ...]:
        """Stages that run at least one MTP depth (consecutive; one stage unless split)."""
        return tuple(i for i, stage in enumerate(self.stages) if "m" in stage)

    @property
    def is_split(self) -> bool:
        return len(self.depth_stages) > 1

    def depths_on(self, stage: int) -> range:
        """The 1-based MTP depths `stage` runs (empty when it runs none)."""
        before = "".join(self.stages[:stage]).count("m")
        return range(before + 1, before + 1 + self.stages[stage].count("m"))

    @property
    def megatron_layout(self) -> str | None:
        """The layout to give Megatron-Core: `layout`, or for a split plan the same trunk with every depth
        on the first depth stage (Megatron asserts one MTP stage; see the module docstring)."""
        if not self.is_split:
            return self.layout
        first, num_depths = self.depth_stages[0], "".join(self.stages).count("m")
        stages = [stage.replace("m", "") for stage in self.stages]
        stages[first] += "m" * num_depths  # a split's first depth stage is never the last: no 'L' there
        return "|".join(stages)

    @property
    def embedding_stages(self) -> tuple[int, ...]:
        """Stages that need the word embedding table: stage 0 and every stage running a depth."""
        return tuple(sorted({0, *self.depth_stages}))

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
    mtp_stages = [i for i, stage in enumerate(stages) if "m" in stage]
    if mtp_stages:
        s = mtp_stages[0]
        if s == 0:
            raise ValueError(
                "MTP cannot run on stage 0: it runs after the trunk's last layer; move the 'm's to a stage >= 1"
            )
        if "t" in flat[flat.index("m") :]:
            raise ValueError(
                f"MTP stage {s} comes before the trunk's last decoder layer: depth 1 consumes the trunk output "
                "h^0, so put every 't' before the 'm's"
            )
        if mtp_stages != list(range(s, mtp_stages[-1] + 1)):
            raise ValueError(
                f"MTP depths on stages {mtp_stages} are not on consecutive stages: depth k needs h^(k-1) from "
                "the stage before; put the 'm's on neighbouring stages (e.g. 'Et*4|tm|mL')"
            )
    for i, stage in enumerate(stages):
        if not stage:
            raise ValueError(f"pipeline stage {i} has no work (no layer, MTP depth, embedding or loss){fix}")
    return mtp_stages[0] if mtp_stages else None


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
    if placement not in ("last", "stage", "split"):
        raise ValueError(f"mtp.placement={placement!r} is unknown; use 'last', 'stage' or 'split'")
    if placement == "split":
        return _plan_split(num_layers, num_depths, pipeline_size, mtp_stage)
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


def _plan_split(num_layers: int, num_depths: int, pipeline_size: int, first: int | None) -> PipelinePlan:
    """`split`: the depths over stages first..last (default: one depth per stage, as many stages as there
    are depths, at most pp - 1), the trunk evenly over stages 0..first, the head and loss on the last."""
    last = pipeline_size - 1
    if num_depths < 1:
        raise ValueError("mtp.placement='split' needs mtp.num_depths >= 1")
    if first is None:
        first = pipeline_size - min(num_depths, last) if last else 0
    if not 1 <= first <= last:
        raise ValueError(
            f"mtp.placement='split' with mtp.mtp_stage={first}: the first depth stage must be in 1..{last} (MTP "
            "cannot run on stage 0, it runs after the trunk's last layer); use pipeline_model_parallel_size >= 2 "
            "and an mtp_stage >= 1"
        )
    num_stages = pipeline_size - first
    if num_stages > num_depths:
        raise ValueError(
            f"mtp.placement='split' with mtp.mtp_stage={first} spreads {num_depths} depth(s) over {num_stages} "
            f"stages ({first}..{last}): more depth stages than depths; use mtp_stage >= {pipeline_size - num_depths}"
        )
    per, extra = divmod(num_depths, num_stages)
    counts = [per + (1 if i < extra else 0) for i in range(num_stages)]
    trunk = _trunk_stages(num_layers, first + 1, "stages up to the first MTP stage")
    stages = trunk[:-1] + tuple(
        (trunk[-1] if i == 0 else "") + "m" * n + ("L" if i == num_stages - 1 else "")
        for i, n in enumerate(counts)
    )
    layout = "|".join(stages)
    return PipelinePlan(stages=stages, layout=None if num_stages == 1 else layout, mtp_stage=first)


def _trunk_stages(num_layers: int, num_stages: int, what: str) -> tuple[str, ...]:
    """The trunk's layers split evenly over `num_stages` stages, the embedding on the first."""
    if num_layers % num_stages:
        raise ValueError(
            f"model.num_layers={num_layers} is not divisible across {num_stages} {what}; change num_layers or "
            "pipeline_model_parallel_size, or give an explicit parallel.pipeline_layout"
        )
    per = num_layers // num_stages
    return tuple(("E" if i == 0 else "") + "t" * per for i in range(num_stages))
