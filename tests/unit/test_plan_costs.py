"""The planner's placements from measured per-piece costs (`--costs`, issue 25): the 1F1B step time of each
placement from a costs file, worked by hand; a split's depths on their own stages; bad costs files."""

from __future__ import annotations

import json

import pytest

from mtp_plugin.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    MTPConfig,
    ParallelConfig,
    TrainingConfig,
)
from mtp_plugin.plan.estimate import LAYER_COSTS_SCHEMA, compare_placements, measured_item_costs, stage_params


def _experiment(num_depths: int = 3, pp: int = 4, **parallel) -> ExperimentConfig:
    parallel.setdefault("pipeline_layout", "Ett|tt|tt|mmmL")  # 6 layers do not split evenly over 4
    return ExperimentConfig(
        model=ModelConfig(num_layers=6, hidden_size=32, num_attention_heads=4, vocab_size=512, num_experts=4),
        mtp=MTPConfig(num_depths=num_depths),
        parallel=ParallelConfig(pipeline_model_parallel_size=pp, **parallel),
        training=TrainingConfig(global_batch_size=8, micro_batch_size=1),
        data=DataConfig(train_prefix="unused", eod_id=0),
    )


def _costs(**items) -> dict:
    """A costs file as benchmarks/layer_costs.py writes it (times in ms)."""
    base = {
        "embedding": (0.5, 1.0),
        "dense_layer": (2.0, 6.0),
        "moe_layer": (3.0, 10.0),
        "depth": (3.0, 10.0),
        "head": (1.0, 4.0),
        "depth_head": (1.0, 3.0),
    }
    base.update(items)
    return {
        "schema": LAYER_COSTS_SCHEMA,
        "device": "test",
        "items": {k: {"fwd_ms": f, "fwd_bwd_ms": fb, "peak_gib": 0.0} for k, (f, fb) in base.items()},
    }


def test_measured_item_costs_follow_the_layer_kinds_depths_and_recompute():
    experiment = _experiment()  # first dense layer, then 5 MoE; D = 3
    costs = measured_item_costs(experiment, _costs())
    assert costs == {"E": [1.0], "t": [6.0] + [10.0] * 5, "m": [10.0] * 3, "L": [4.0 + 3 * 3.0]}
    recomputed = _experiment(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert measured_item_costs(recomputed, _costs())["t"] == [8.0] + [13.0] * 5  # + the forward again


def test_placements_step_time_from_measured_costs():
    """E t*6 m*3 L over 4 stages, 8 micro-batches: 1F1B time = Σ stages + 7 x slowest, by hand."""
    results = {r.name: r for r in compare_placements(_experiment(), ("Ett", "tt", "tt", "mmmL"), 8, _costs())}
    configured = results["configured"]
    assert configured.unit == "ms"
    assert configured.stage_costs == [1 + 6 + 10, 20, 20, 30 + 13]
    assert configured.step_time == pytest.approx(sum(configured.stage_costs) + 7 * 43)
    # `last`: the depths and the head stay together on the last stage (43 ms), the trunk balanced before
    # them; `split` spreads the depths over two or more stages, e.g. E t t t | t t t | m m | m L = 27, 30,
    # 20, 23 ms. Both move the same 100 ms of work through the pipeline: 100 + 7 x slowest.
    last, split = results["last"], results["split"]
    assert last.stages[-1] == "mmmL" and max(last.stage_costs) == 43
    assert last.step_time == pytest.approx(100 + 7 * 43)
    depth_stages = [s for s, stage in enumerate(split.stages) if "m" in stage]
    assert len(depth_stages) >= 2 and depth_stages == list(range(depth_stages[0], len(split.stages)))
    assert max(split.stage_costs) == 30 and sum(split.stage_costs) == 100
    assert split.step_time == pytest.approx(100 + 7 * 30)
    assert split.step_time_rel == pytest.approx(310 / 401)
    # Stage-time spread: (slowest - fastest) / slowest.
    assert split.to_json()["stage_spread"] == pytest.approx(
        (max(split.stage_costs) - min(split.stage_costs)) / max(split.stage_costs)
    )
    assert split.to_json()["stage_ms"] == split.stage_costs


def test_split_stage_holds_only_its_depths_parameters():
    from mtp_plugin.plan.estimate import ParamRecord

    records = [
        ParamRecord(
            name=f"mtp_stack.depths.{k}.eh_proj.linear.weight",
            numel=100 * (k + 1),
            expert=False,
            tp_sharded=True,
        )
        for k in range(3)
    ] + [ParamRecord(name="embedding.word_embeddings.weight", numel=7, expert=False, tp_sharded=True)]
    per_stage = stage_params(records, ("Etttttt", "m", "m", "mL"), _experiment())
    # Every depth stage holds the table's copy (7) and its own depth only.
    assert [p.total for p in per_stage] == [7, 7 + 100, 7 + 200, 7 + 300]


@pytest.mark.parametrize(
    ("costs", "message"),
    [
        ({"schema": "other"}, "is not 'mtp_plugin.layer_costs/1'"),
        ({"schema": LAYER_COSTS_SCHEMA, "items": {"embedding": {}}}, "costs file has no depth, head"),
    ],
)
def test_bad_costs_file_names_the_fix(costs, message):
    with pytest.raises(ValueError, match=message):
        measured_item_costs(_experiment(), costs)


def test_costs_file_round_trips_json(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(_costs()))
    assert measured_item_costs(_experiment(), json.loads(path.read_text()))["m"] == [10.0] * 3
