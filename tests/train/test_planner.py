"""`python -m mtp_plugin.plan`: every shipped config plans on the meta device; DeepSeek-V3's published
sizes; the planner's per-stage parameter counts equal the real model's, stage by stage; bad input is
one line naming the field, before anything is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import run_distributed
from scaled_models import local_spec_cannot_build, scaled_model_overrides, shipped_model_names
from train_tiny import REPO, repo_env, write_tiny_corpus

from mtp_plugin.train.hydra_app import group_options

pytestmark = [pytest.mark.megatron]

# Options made for each other: planned together (alone with the toy model they are refused, rightly).
V3_PLAN = ["experiment=deepseek_v3_671b"]
COMPANIONS = {
    ("parallel", "pp16_ep64"): V3_PLAN,
    ("cluster", "h800_2048"): V3_PLAN,
    ("training", "deepseek_v3"): V3_PLAN,
    ("cluster", "slurm"): ["training.global_batch_size=32"],  # 8 GPUs x micro-batch 4
}
SHIPPED = [(g, o) for g, options in group_options().items() for o in options if g != "data"]
# Per-stage counts against real pp=2 stages: toy (untied and tied), small, every shipped model scaled down.
REAL_VOCAB = 512  # the tiny corpus's


def _stage_jobs() -> dict[str, list[str]]:
    tied = "model.untie_embeddings_and_output_weights=false"
    jobs = {
        "toy": ["model=toy"],
        "toy-tied": ["model=toy", tied],  # the loss stage's table serves MTP and the head
        "toy-tied-D0": ["model=toy", tied, "mtp=off"],  # the loss stage holds a copy of the table
        "small": ["model=small"],
    }
    for name in shipped_model_names():
        if not local_spec_cannot_build(name):
            jobs[f"scaled-{name}"] = [
                *scaled_model_overrides(name, vocab_size=REAL_VOCAB),
                f"data.eod_id={REAL_VOCAB - 1}",
            ]
    return {k: [*v, "parallel=pp2", *([] if "mtp=off" in v else ["mtp=d2"])] for k, v in jobs.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def plans(corpus):
    """Every job planned in one process (tests/plan_jobs.py): the shipped options and the stage jobs."""
    train, valid = corpus
    data = [f"data.train_prefix={train}", f"data.valid_prefix={valid}"]
    jobs = {f"{g}={o}": [f"{g}={o}", *COMPANIONS.get((g, o), []), *data] for g, o in SHIPPED}
    jobs["data=indexed"] = ["data=indexed", f"data.prefix={train}"]
    jobs["data=demo"] = ["data=demo", *data]
    jobs.update({k: [*v, *data] for k, v in _stage_jobs().items()})
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "plan_jobs.py")],
        input=json.dumps(list(jobs.values())),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=repo_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(jobs, json.loads(proc.stdout)))


KEYS = {
    "total_params",
    "active_params",
    "mtp_params",
    "params_per_stage",
    "memory_per_stage_gib",
    "flops_per_token",
    "placements",
}


@pytest.mark.parametrize("job", [f"{g}={o}" for g, o in SHIPPED] + ["data=indexed", "data=demo"])
def test_every_shipped_config_plans_on_meta(plans, job):
    plan = plans[job]
    if job.startswith("model=") and local_spec_cannot_build(job.split("=", 1)[1]):
        assert "model.qk_layernorm=true with model.q_lora_rank=null needs TransformerEngine" in plan["error"]
        return
    assert "error" not in plan, plan.get("error")
    assert set(plan) >= KEYS
    stages = plan["params_per_stage"]
    assert len(stages) == len(plan["memory_per_stage_gib"]) == len(plan["layout"].split("|"))
    # Each stage's parameters, summed, are the model's once the copies of the embedding/head are removed.
    assert sum(s["params"] for s in stages) >= plan["total_params"] + plan["mtp_params"]["unique"]
    assert 0 < plan["active_params"] <= plan["total_params"]
    assert all(m["total"] > 0 for m in plan["memory_per_stage_gib"])
    depths = len(plan["rho"]) - 1
    assert [r["depths"] for r in plan["rho"]] == list(range(depths + 1))
    assert all(p["step_time_rel"] > 0 for p in plan["placements"])


def test_deepseek_v3_plan_matches_the_published_sizes(plans):
    plan = plans["parallel=pp16_ep64"]
    assert plan["world_size"] == 2048 and plan["data_parallel_size"] == 128
    assert plan["total_params"] == pytest.approx(671e9, rel=0.005)
    assert plan["active_params"] == pytest.approx(37e9, rel=0.03)
    # The MTP module: ~11.6 B of its own; with its copies of the embedding and head the published
    # checkpoint's 671 B + 14 B (685 B) within 1%.
    assert plan["mtp_params"]["unique"] == pytest.approx(11.6e9, rel=0.01)
    assert plan["mtp_params"]["checkpoint_total"] == pytest.approx(685e9, rel=0.01)
    assert len(plan["params_per_stage"]) == 16 and plan["params_per_stage"][-1]["holds"] == "tmL"
    assert all(m["fits"] for m in plan["memory_per_stage_gib"]), plan["memory_per_stage_gib"]
    # One MTP depth is ~4% of the training FLOPs at this shape (DESIGN.md §3); rho doubles bits for +4%.
    assert 0.03 < plan["flops_per_token"]["mtp_share_of_training"] < 0.06
    names = {p["name"]: p for p in plan["placements"]}
    assert {"configured", "last", "mtp_stage", "standalone"} <= set(names)
    assert names["last"]["step_time_rel"] == 1.0
    # A loss stage of its own leaves the head alone on a stage: slower than `last` at this shape.
    assert names["mtp_stage"]["step_time_rel"] > 1.0
    assert names["standalone"]["layout"].endswith("|m|L")
    # The sbatch line of cluster=h800_2048: the allocation slurm/deepseek_v3_671b.sbatch asks for.
    assert plan["sbatch"] == "sbatch --nodes=256 --ntasks-per-node=8 --gpus-per-node=8 slurm/train.sbatch"
    assert plans["cluster=local"]["sbatch"] is None


def test_split_placement_puts_one_depth_per_stage(plans):
    names = {p["name"]: p for p in plans["mtp=d3"]["placements"]}
    assert set(names) == {"configured", "last"}  # one stage: nothing to place
    # pp=2 with D=2: split needs a stage per depth.
    names = {p["name"]: p for p in plans["small"]["placements"]}
    assert {"last", "mtp_stage", "split"} <= set(names)
    assert names["split"]["layout"].count("m") == 2 and "mm" not in names["split"]["layout"]


def _real_stage_worker(jobs: dict[str, list[str]]) -> dict[str, int]:
    """This pipeline rank's parameter count for each job, built for real on CPU by the training path."""
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from mtp_plugin.megatron import build_mtp_gpt_model, transformer_config_from
    from mtp_plugin.train.hydra_app import compose_experiment

    rank = ps.get_pipeline_model_parallel_rank()
    counts = {}
    for name, overrides in jobs.items():
        experiment = compose_experiment(overrides)
        model_cfg = dataclasses.replace(experiment.model, moe_token_dispatcher_type="allgather")
        config = transformer_config_from(
            model_cfg,
            experiment.parallel,
            experiment.mtp,
            params_dtype=torch.bfloat16,
            perform_initialization=False,
        )
        model = build_mtp_gpt_model(
            model_cfg,
            experiment.mtp,
            config,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
        )
        counts[name] = (rank, sum(p.numel() for p in model.parameters()))
        del model
    return counts


def test_planner_counts_equal_the_real_model_per_stage(plans, corpus):
    train, valid = corpus
    data = [f"data.train_prefix={train}", f"data.valid_prefix={valid}"]
    jobs = {k: [*v, *data] for k, v in _stage_jobs().items()}
    results = run_distributed(
        _real_stage_worker, 2, jobs, parallel=dict(pipeline_model_parallel_size=2), timeout=300
    )
    for name in jobs:
        planned = [s["params"] for s in plans[name]["params_per_stage"]]
        real = [dict(r[name] for r in results)[s] for s in range(2)]
        assert planned == real, (name, planned, real)
    assert "scaled-deepseek_v3" in jobs


# ------------------------------------------------------------------------------------------ bad input

BAD = [
    (["model=nope"], "model=nope"),
    (["parallel=pp2", "--world-size", "3"], "world size 3 is not divisible"),
    (["parallel.expert_model_parallel_size=3", "--world-size", "3"], "num_experts=8 is not divisible"),
    (["parallel=pp2", "model.num_layers=5"], "model.num_layers=5 cannot be split evenly"),
    (["mtp=d3", "model.seq_length=3"], "must be below the sequence length 3"),
    (["model=deepseek_v3", "model.kv_lora_rank=9000"], "model.kv_lora_rank=9000 exceeds model.hidden_size"),
    (
        ["parallel.pipeline_layout=Et*2|t*2mmL"],
        "pipeline layout has 2 stages but pipeline_model_parallel_size=1",
    ),
    # split (issue 25): more depth stages than depths; depths on stages that are not consecutive
    (
        ["parallel.pipeline_model_parallel_size=4", "mtp=d2", "mtp.placement=split", "mtp.mtp_stage=1"],
        "more depth stages than depths",
    ),
    (
        ["parallel.pipeline_model_parallel_size=4", "mtp=d2", "parallel.pipeline_layout=Et*4|m||mL"],
        "are not on consecutive stages",
    ),
    (["--costs", "/nonexistent/costs.json"], "--costs /nonexistent/costs.json"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_before_any_build(argv, message, capsys, monkeypatch, corpus):
    from mtp_plugin.plan import __main__ as cli
    from mtp_plugin.plan import build

    def no_build(_experiment):
        raise AssertionError("the planner started building the model for a configuration it must refuse")

    monkeypatch.setattr(build, "parameter_table", no_build)
    train, valid = corpus
    data = (
        []
        if any(a.startswith("data.") for a in argv)
        else [f"data.train_prefix={train}", f"data.valid_prefix={valid}"]
    )
    assert cli.main([*argv, *data]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert Path(REPO).is_dir()


def test_a_run_is_sized_without_its_data_with_one_warning(capsys):
    """Before: a planner refused to size a run whose corpus is not on this machine (DeepSeek-V3 on a laptop)."""
    from mtp_plugin.plan import __main__ as cli

    assert cli.main(["model=toy", "mtp=d2", "data.train_prefix=/nonexistent/corpus"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("plan "), out[:500]
    assert err.strip().splitlines() == [
        "warning: data.train_prefix=/nonexistent/corpus: /nonexistent/corpus.bin does not exist; run `make "
        "data` (or `python -m mtp_plugin.data prepare --out DIR`) or point data.train_prefix at an indexed "
        "dataset (the plan does not read the data; training will refuse this)"
    ]
