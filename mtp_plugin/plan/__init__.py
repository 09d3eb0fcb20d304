"""Size a configured run without a GPU: `python -m mtp_plugin.plan <overrides> [--json]`.

`plan_experiment` validates the experiment as training does (world size, parallel layout, pipeline
plan; missing dataset files are a warning, not a refusal), builds the model on the meta device through the training classes
(`mtp_plugin.plan.build`), and reports parameters (total, active, MTP), parameters and per-GPU memory
per pipeline stage, FLOPs per token, ρ for k = 0..D, stage costs and the 1F1B step time of each MTP
placement (`last`, `mtp_stage`, `standalone`, `split`), ranked, from the FLOPs model or from measured
per-piece costs (`costs`: the file `benchmarks/layer_costs.py` writes); `mtp_plugin.plan.estimate` has
the formulas.
"""

from __future__ import annotations

import math

from mtp_plugin.accounting.model_flops import token_flops
from mtp_plugin.config import ExperimentConfig
from mtp_plugin.plan.estimate import (
    ParamRecord,
    compare_placements,
    layout_string,
    param_totals,
    rho_by_depth,
    stage_memory,
    stage_params,
)

__all__ = ["check_plan", "data_warnings", "default_world_size", "format_report", "plan_experiment"]


def default_world_size(experiment: ExperimentConfig) -> int:
    """A Slurm cluster's GPUs; for a local run (sized by torchrun) the fewest processes the sizes allow."""
    if experiment.cluster.launcher != "local" or experiment.cluster.gpus_per_node > 1:
        return experiment.cluster.world_size
    par = experiment.parallel
    cp, ep = par.context_parallel_size, par.expert_model_parallel_size
    return par.model_parallel_size * (ep // math.gcd(ep, cp))


def check_plan(experiment: ExperimentConfig, world_size: int | None = None):
    """Training's checks that need no model: (world size, data parallel size, micro-batches, pipeline plan).
    Raises ValueError with one line naming the field and the fix. The dataset files are not checked
    here (`data_warnings`): sizing needs none of them."""
    from mtp_plugin.megatron.config import check_supported

    world = world_size or default_world_size(experiment)
    dp = experiment.check_world_size(world)
    num_micro = experiment.training.num_micro_batches(dp)
    plan = check_supported(experiment.model, experiment.parallel, experiment.mtp)
    return world, dp, num_micro, plan


def data_warnings(experiment: ExperimentConfig) -> list[str]:
    """What training would refuse about the dataset files ([] if nothing), for the plan to warn about:
    e.g. DeepSeek-V3 sized on a laptop that does not hold its corpus."""
    try:
        experiment.data.check_files()
    except OSError as err:
        return [f"{err} (the plan does not read the data; training will refuse this)"]
    return []


def plan_experiment(
    experiment: ExperimentConfig,
    *,
    world_size: int | None = None,
    device_memory_gib: float | None = None,
    records: list[ParamRecord] | None = None,
    costs: dict | None = None,
) -> dict:
    """The plan as a JSON-able dict; `records` is the model's parameter table (default: built on the meta
    device); `costs` a measured costs file (default: placements from the FLOPs model). Raises ValueError /
    FileNotFoundError (one line) on bad input, before building anything."""
    world, dp, num_micro, plan = check_plan(experiment, world_size)
    placements = compare_placements(experiment, plan.stages, num_micro, measured=costs)
    memory_limit = device_memory_gib or experiment.cluster.device_memory_gib
    if records is None:
        from mtp_plugin.plan.build import parameter_table

        records = parameter_table(experiment)
    totals = param_totals(records, experiment.model)
    per_stage = stage_params(records, plan.stages, experiment)
    memory = stage_memory(experiment, plan.stages, per_stage, data_parallel_size=dp)
    flops = token_flops(experiment.model)
    flop_placements = placements if costs is None else compare_placements(experiment, plan.stages, num_micro)
    D = experiment.mtp.num_depths
    return {
        "world_size": world,
        "data_parallel_size": dp,
        "num_micro_batches": num_micro,
        "device_memory_gib": memory_limit,
        "layout": layout_string(plan.stages),
        "total_params": totals.main,
        "active_params": totals.active,
        "mtp_params": {
            "unique": totals.mtp_unique,
            "with_shared_embedding_and_head": totals.mtp_with_shared if D else 0,
            "checkpoint_total": totals.main + totals.mtp_with_shared if D else totals.main,
        },
        "params_per_stage": [
            {"stage": s, "holds": st, "params": p.total, "params_per_gpu": round(p.per_gpu)}
            for s, (st, p) in enumerate(zip(plan.stages, per_stage))
        ],
        "memory_per_stage_gib": [m.to_gib(memory_limit) for m in memory],
        "flops_per_token": {
            "main_forward": flops.trunk,
            "mtp_forward_per_depth": flops.mtp_per_depth,
            "training": flops.training(D),
            "mtp_share_of_training": 1 - flops.training(0) / flops.training(D),
            "seed_6n_active": 6 * totals.active,
        },
        "rho": rho_by_depth(experiment.model, flops, D),
        "stage_tflops": [c / 1e12 for c in flop_placements[0].stage_costs],
        "placements": [p.to_json() for p in placements],
        "ranking": [p.name for p in sorted(placements[1:], key=lambda p: p.step_time)],
        "costs": None
        if costs is None
        else {
            "device": costs.get("device"),
            "dtype": costs.get("dtype"),
            "micro_batch_size": costs.get("micro_batch_size"),
            "seq_length": costs.get("seq_length"),
            "hidden_size": costs.get("model", {}).get("hidden_size"),
            "num_experts": costs.get("model", {}).get("num_experts"),
        },
        "sbatch": _sbatch_command(experiment),
        "warnings": data_warnings(experiment),
    }


def _sbatch_command(experiment: ExperimentConfig) -> str | None:
    """How to submit this run to a Slurm cluster (slurm/README.md), or None for a local one."""
    if experiment.cluster.launcher != "slurm":
        return None
    script = "slurm/deepspeed.sbatch" if experiment.backend.name == "deepspeed" else "slurm/train.sbatch"
    return " ".join(["sbatch", *experiment.cluster.sbatch_options(), script])


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def format_report(report: dict, name: str = "") -> str:
    mtp = report["mtp_params"]
    lines = [
        f"plan {name}: {report['world_size']} GPUs (data parallel {report['data_parallel_size']}, "
        f"{report['num_micro_batches']} micro-batches per step), layout {report['layout']}",
        f"parameters: main {_count(report['total_params'])} ({report['total_params']:,}), active per token "
        f"{_count(report['active_params'])}; MTP {_count(mtp['unique'])} unique, "
        f"{_count(mtp['with_shared_embedding_and_head'])} with the shared embedding and head "
        f"(a checkpoint with separate copies: {_count(mtp['checkpoint_total'])})",
        "",
        f"{'stage':>5} {'holds':<14} {'params':>12} {'per GPU':>12} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'activ':>8} {'(mtp)':>7} {'total GiB':>9}  fits {report['device_memory_gib']:g} GiB",
    ]
    for p, m in zip(report["params_per_stage"], report["memory_per_stage_gib"]):
        holds = p["holds"] if len(p["holds"]) <= 14 else p["holds"][:11] + "..."
        lines.append(
            f"{p['stage']:>5} {holds:<14} {_count(p['params']):>12} {_count(p['params_per_gpu']):>12} "
            f"{m['weights']:>8.2f} {m['gradients']:>8.2f} {m['optimizer']:>8.2f} {m['activations']:>8.2f} "
            f"{m['mtp']:>7.2f} {m['total']:>9.2f}  {'yes' if m['fits'] else 'NO'}"
        )
    f = report["flops_per_token"]
    lines += [
        "",
        f"FLOPs per token (forward): main {f['main_forward']:.4g}, each MTP depth {f['mtp_forward_per_depth']:.4g}; "
        f"training {f['training']:.4g} (MTP {100 * f['mtp_share_of_training']:.1f}%; seed 6N_active "
        f"{f['seed_6n_active']:.4g})",
        "rho ceiling: "
        + ", ".join(
            f"k={r['depths']}: {r['rho_bits_per_gflop']:.4g} bits/GFLOP (FLOPs x{r['flops_vs_ntp']:.3f})"
            for r in report["rho"]
        ),
        "",
    ]
    costs = report.get("costs")
    if costs:
        lines.append(
            f"pipeline placements (1F1B, measured costs: {costs['device']}, {costs['dtype']}, micro-batch "
            f"{costs['micro_batch_size']} x {costs['seq_length']}, hidden {costs['hidden_size']}, "
            f"{costs['num_experts'] or 0} experts; step time relative to `last`):"
        )
    else:
        lines.append("pipeline placements (1F1B, FLOPs model, step time relative to `last`):")
    for p in report["placements"]:
        step = f"  {p['step_time_ms']:>9.1f} ms" if "step_time_ms" in p else ""
        lines.append(
            f"  {p['name']:<11} {p['step_time_rel']:>6.3f}{step}  idle {100 * p['idle_fraction']:4.1f}%  "
            f"spread {100 * p['stage_spread']:4.1f}%  {p['layout']}"
        )
        per_stage = (
            "stage ms/micro-batch: " + " ".join(f"{c:.3g}" for c in p["stage_ms"])
            if "stage_ms" in p
            else "stage TFLOPs/micro-batch: " + " ".join(f"{c:.3g}" for c in p["stage_tflops"])
        )
        lines.append(f"  {'':<11} {per_stage}")
    if report.get("ranking"):
        lines.append("ranked (fastest first): " + ", ".join(report["ranking"]))
    if report.get("sbatch"):
        lines += ["", f"launch: {report['sbatch']} <the same overrides>"]
    return "\n".join(lines)
