"""`python -m mtp_plugin.train`: shipped configs compose into the dataclasses, bad input is one line
naming the field and the fix, the log line parses, and the Hydra app trains the toy MoE."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from train_tiny import TINY_MODEL_OVERRIDES, by_step, run_app, train_exit_and_resume, write_tiny_corpus

from mtp_plugin.config import ExperimentConfig
from mtp_plugin.train import logs
from mtp_plugin.train.hydra_app import (
    CONFIG_DIR,
    ConfigError,
    check_group_overrides,
    group_options,
    register_configs,
    to_experiment,
    validate_for_launch,
)


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _experiment(*overrides: str) -> ExperimentConfig:
    return to_experiment(_compose(*overrides))


SHIPPED = [(group, option) for group, options in group_options().items() for option in options]
# Options made for one model: composed with it (alone with the toy model they are refused, as they should be).
COMPANIONS = {("parallel", "pp16_ep64"): ["model=deepseek_v3", "mtp=deepseek_v3"]}


def test_groups_are_the_documented_ones():
    groups = group_options()
    assert {"model", "mtp", "parallel", "backend", "data", "training", "experiment"} <= set(groups)
    assert {"toy", "small"} <= set(groups["model"])
    assert {"off", "d1", "d2", "d3", "deepseek_v3"} <= set(groups["mtp"])
    assert {"single", "pp2", "pp2_ep2", "pp16_ep64"} <= set(groups["parallel"])
    assert {"toy", "small", "deepseek_v2_lite", "deepseek_v3"} <= set(groups["model"])
    assert {"local", "slurm"} <= set(groups["cluster"])
    assert "toy_demo" in groups["experiment"]


@pytest.mark.parametrize(("group", "option"), SHIPPED, ids=[f"{g}={o}" for g, o in SHIPPED])
def test_every_shipped_config_composes_and_builds(group, option):
    overrides = [f"{group}={option}", *COMPANIONS.get((group, option), [])]
    if group == "data" and option == "indexed":
        overrides.append("data.prefix=/some/corpus_text_document")
    experiment = _experiment(*overrides)
    assert isinstance(experiment, ExperimentConfig)
    assert type(experiment.model).__name__ == "ModelConfig"
    assert type(experiment.mtp.lambda_schedule).__name__ == "LambdaScheduleConfig"
    experiment.mtp.lambda_schedule.build()


def test_defaults_are_the_toy_deepseek_moe():
    model = _experiment().model
    assert (model.num_layers, model.hidden_size, model.first_dense_layers) == (4, 128, 1)
    assert (model.num_experts, model.moe_router_topk, model.vocab_size) == (8, 2, 50257)
    assert model.moe_shared_expert_size > 0 and 128 <= model.seq_length <= 256


def test_toy_demo_switches_lambda_at_two_thirds_of_the_run():
    experiment = _experiment("experiment=toy_demo", "training.train_iters=30")
    run_tokens = 30 * experiment.training.global_batch_size * experiment.model.seq_length
    schedule = experiment.mtp.lambda_schedule.build()
    (switch,) = experiment.mtp.lambda_schedule.boundaries_tokens
    assert switch == pytest.approx(run_tokens * 2 / 3, rel=1e-3)
    assert experiment.mtp.num_depths == 2
    assert schedule(0) == 0.3 and schedule(run_tokens) == 0.1


def test_command_line_overrides_reach_the_dataclasses():
    experiment = _experiment("mtp=d3", "training.train_iters=17", "model.hidden_size=64", "parallel=pp2_ep2")
    assert experiment.mtp.num_depths == 3
    assert experiment.training.train_iters == 17
    assert experiment.model.hidden_size == 64
    assert experiment.parallel.expert_model_parallel_size == 2


@pytest.mark.megatron
def test_dropout_is_off_by_default_and_reaches_megatron():
    from mtp_plugin.megatron.config import transformer_config_from

    default = _experiment()
    assert (default.model.hidden_dropout, default.model.attention_dropout) == (0.0, 0.0)
    experiment = _experiment("model.hidden_dropout=0.1", "model.attention_dropout=0.2")
    config = transformer_config_from(experiment.model, experiment.parallel, experiment.mtp)
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.2)


# ------------------------------------------------------------------ bad input: one line, field + fix


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message, message
    assert message.startswith("error: ")
    return message


def test_unknown_group_option():
    with pytest.raises(ConfigError) as err:
        check_group_overrides(["model=huge"])
    message = _one_line(err.value)
    assert "model=huge" in message and "small, toy" in message


def test_unknown_option_inside_a_sweep():
    with pytest.raises(ConfigError) as err:
        check_group_overrides(["--multirun", "mtp=d1,d9"])
    assert "mtp=d9" in _one_line(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            ["model.num_experts=6", "parallel.expert_model_parallel_size=4"],
            "parallel.expert_model_parallel_size",
        ),
        (["model.num_layers=3", "parallel=pp2"], "parallel.pipeline_model_parallel_size"),
        (["mtp.num_depths=128"], "mtp.num_depths"),
        (["training.global_batch_size=6", "training.micro_batch_size=4"], "training.micro_batch_size"),
        (["data=indexed"], "data.prefix"),
        (["mtp.lambda_schedule.kind=exponential"], "mtp.lambda_schedule.kind"),
    ],
    ids=["experts-vs-ep", "layers-vs-stages", "depth-vs-seq", "batch-split", "missing-prefix", "lambda-kind"],
)
def test_bad_config_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _experiment(*overrides)
    assert field in _one_line(err.value)


def test_parallel_sizes_must_fit_the_world_size():
    experiment = _experiment("parallel=pp2")
    with pytest.raises(ConfigError) as err:
        validate_for_launch(experiment, world_size=3, cuda=False)
    message = _one_line(err.value)
    assert "world size 3" in message and "pipeline (2)" in message and "parallel sizes" in message


def test_global_batch_must_split_over_data_parallel_ranks():
    experiment = _experiment("training.global_batch_size=4", "training.micro_batch_size=4")
    with pytest.raises(ConfigError) as err:
        validate_for_launch(experiment, world_size=2, cuda=False)
    assert "training.global_batch_size" in _one_line(err.value)


def test_missing_dataset(tmp_path):
    experiment = _experiment(f"data.train_prefix={tmp_path}/nothing_text_document")
    with pytest.raises(ConfigError) as err:
        validate_for_launch(experiment, world_size=1, cuda=False)
    message = _one_line(err.value)
    assert "data.train_prefix" in message and "make data" in message


def test_dataset_with_token_ids_beyond_the_vocabulary_is_rejected_before_launch(tmp_path):
    from mtp_plugin.data import max_token_id, write_indexed_dataset

    prefix = str(tmp_path / "wide_text_document")
    # Tokenized with a 1024-id vocabulary (ids up to 700), trained with a 512-id model.
    write_indexed_dataset(prefix, [[5, 700, 9], [3, 4]], eod_id=1023, vocab_size=1024)
    assert max_token_id(prefix) == 1023
    experiment = _experiment(
        f"data.train_prefix={prefix}", "data.valid_prefix=null", "model.vocab_size=512", "data.eod_id=511"
    )
    with pytest.raises(ConfigError) as err:
        validate_for_launch(experiment, world_size=1, cuda=False)
    message = _one_line(err.value)
    assert f"data.train_prefix={prefix} holds token id 1023 but model.vocab_size=512" in message
    assert "set model.vocab_size" in message
    # The same data under a vocabulary that holds it passes every check.
    fits = _experiment(
        f"data.train_prefix={prefix}",
        "data.valid_prefix=null",
        "model.vocab_size=1024",
        "data.eod_id=1023",
        "model.seq_length=4",  # the 7 tokens hold one sample
    )
    validate_for_launch(fits, world_size=1, cuda=False)


def test_shipped_mtp_configs_score_the_depths_in_chunks():
    """Memory-flat by default: no shipped config keeps a depth's full logits; 0 stays an explicit choice."""
    from mtp_plugin.config import MTPConfig
    from mtp_plugin.core import DEFAULT_LOSS_CHUNK_TOKENS

    assert MTPConfig().loss_chunk_tokens == DEFAULT_LOSS_CHUNK_TOKENS == 4096
    overrides = [f"mtp={o}" for o in group_options()["mtp"]] + [
        f"experiment={o}" for o in group_options()["experiment"]
    ]
    for override in overrides:
        mtp = _experiment(override).mtp
        if mtp.enabled:
            assert mtp.loss_chunk_tokens >= 1024, override
    assert _experiment("mtp.loss_chunk_tokens=0").mtp.loss_chunk_tokens == 0


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("training.clip_grad=1.0", "training.clip_grad=0"),
        # Before: a TypeError from Megatron's DistributedOptimizer after the model was built.
        ("backend.use_distributed_optimizer=true", "backend.use_distributed_optimizer=false"),
    ],
    ids=["clip-grad", "distributed-optimizer"],
)
def test_cuda_only_settings_on_cpu_are_rejected_before_launch(override, fix):
    experiment = _experiment(override)
    with pytest.raises(ConfigError) as err:
        validate_for_launch(experiment, world_size=1, cuda=False)
    assert fix in _one_line(err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model=huge"], "model=huge"),
        (["parallel=pp2"], "world size 1"),
        (["data.train_prefix=/nonexistent/corpus_text_document"], "data.train_prefix"),
    ],
    ids=["unknown-option", "world-size", "missing-dataset"],
)
def test_app_exits_with_one_error_line(args, needle, tmp_path):
    proc = run_app(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the log line


def test_log_line_round_trips():
    line = logs.format_train_line(
        iteration=20,
        train_iters=100,
        consumed_tokens=20480,
        ms_per_iter=812.25,
        tokens_per_second=1260.6,
        lr=9e-4,
        global_batch_size=8,
        metrics={
            "lm loss": 7.25,
            "mtp_1 loss": 7.5,
            "mtp_1 acceptance": 0.125,
            "mtp_2 loss": 7.75,
            "mtp_2 acceptance": 0.0625,
        },
        lam=0.3,
        grad_norm=1.5,
    )
    fields = logs.parse_log_line(line)
    assert fields["iteration"] == 20 and fields["train iters"] == 100
    assert fields["consumed tokens"] == 20480
    assert fields["elapsed time per iteration (ms)"] == pytest.approx(812.2, abs=0.1)
    assert fields["tokens per second"] == pytest.approx(1260.6)
    assert fields["learning rate"] == pytest.approx(9e-4)
    assert fields["lm loss"] == 7.25 and fields["mtp_2 loss"] == 7.75 and fields["mtp_1 acceptance"] == 0.125
    assert fields["mtp lambda"] == 0.3 and fields["grad norm"] == 1.5
    assert "validation" not in fields


def test_validation_line_parses_with_training_keys():
    line = logs.format_validation_line(40, {"lm loss": 6.5, "mtp_1 loss": 6.75, "mtp_1 acceptance": 0.2})
    fields = logs.parse_log_line(line)
    assert fields["validation"] == 1.0 and fields["iteration"] == 40
    assert fields["lm loss"] == 6.5 and fields["mtp_1 loss"] == 6.75 and fields["mtp_1 acceptance"] == 0.2


def test_other_lines_are_not_log_lines():
    assert logs.parse_log_line(" saved checkpoint /x/iter_0000002 at iteration 2") is None
    assert logs.parse_log_line("[HYDRA] Launching 2 jobs locally") is None


# ------------------------------------------------------------------ the app trains


@pytest.mark.megatron
@pytest.mark.slow
def test_toy_experiment_trains_20_steps_and_every_depth_loss_falls(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run_app(
        "experiment=toy_demo",
        *TINY_MODEL_OVERRIDES,
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        "training.train_iters=20",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr_warmup_iters=2",
        "training.log_interval=5",
        "training.eval_interval=10",
        "training.save_interval=10",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = [logs.parse_log_line(line) for line in proc.stdout.splitlines()]
    train_lines = [p for p in parsed if p and "validation" not in p]
    valid_lines = [p for p in parsed if p and "validation" in p]
    assert [p["iteration"] for p in train_lines] == [5, 10, 15, 20]
    assert [p["iteration"] for p in valid_lines] == [10, 20]
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        assert train_lines[-1][key] < train_lines[0][key] - 0.3, (
            key,
            train_lines[0][key],
            train_lines[-1][key],
        )
        assert valid_lines[-1][key] < valid_lines[0][key], key
    # λ follows DeepSeek-V3's schedule scaled to the run: 0.3, then 0.1 after 2/3 of the tokens, from
    # the iteration the start-up summary names (issue 16).
    assert train_lines[0]["mtp lambda"] == 0.3 and train_lines[-1]["mtp lambda"] == 0.1
    (summary,) = [line for line in proc.stdout.splitlines() if line.startswith(" MTP D = ")]
    switch = int(re.search(r"then 0.1 from [\d,]+ tokens \(iteration (\d+) of 20\)", summary).group(1))
    lam = by_step(logs.read_scalars(run_dir / "tensorboard" / logs.ScalarWriter.JSONL_NAME), "mtp lambda")
    assert switch == min(step for step, value in lam.items() if value == 0.1) == 15, (summary, lam)
    assert "D = 2" in summary and "4096-token chunks" in summary
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    assert (run_dir / "tensorboard" / "loss_curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # Start-up progress comes before the first iteration line; every printed line is in train.log too.
    out_lines = proc.stdout.splitlines()
    first_iteration_line = next(i for i, p in enumerate(parsed) if p)
    assert any(line.endswith("building the model ...") for line in out_lines[:first_iteration_line])
    assert any("starting training at iteration 0 of 20" in line for line in out_lines[:first_iteration_line])
    # Output is not a terminal (no progress bar): one line per iteration until the first log line.
    progress = [
        re.search(r"\] iteration (\d+) of 20 took [\d.]+ s, lm loss [\d.]+(.*)$", line) for line in out_lines
    ]
    progress = [(int(m.group(1)), m.group(2)) for m in progress if m]
    assert [it for it, _ in progress] == [1, 2, 3, 4], out_lines[:first_iteration_line]
    assert progress[0][1] == "; a log line every 5 iterations (training.log_interval), the first at 5"
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert [p["iteration"] for p in map(logs.parse_log_line, log_lines) if p] == [5, 10, 10, 15, 20, 20]
    assert any("saved checkpoint" in line for line in log_lines) and "finished 20 iterations" in log_lines[-1]


@pytest.mark.megatron
@pytest.mark.slow
def test_exit_interval_then_rerun_resumes_bit_exact(tmp_path):
    """`training.exit_interval` saves and exits; the same command again resumes to the uninterrupted
    run's exact values (scalars.jsonl). Dropout is on (Megatron-LM's 0.1), so the resumed run draws the
    uninterrupted run's masks only if the checkpoint restored the RNG states. The GPU twin, bf16 with
    D = 0/1/2: tests/gpu/test_gpu_train_app.py."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    args = [
        *TINY_MODEL_OVERRIDES,
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        "training.train_iters=4",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr_warmup_iters=1",
        "training.log_interval=1",
        "training.eval_interval=2",
        "training.progress_bar=off",
    ]
    runs = train_exit_and_resume(tmp_path, args, exit_at=2)
    assert "exiting at iteration 2" in runs["exit"] and "at iteration 2" in runs["resume"]
    # The resumed run's last line says both: where the run is and what this launch trained.
    assert (
        runs["resume"]
        .splitlines()[-1]
        .startswith(
            " finished at iteration 4 (512 tokens in all); this run resumed at 2 and trained 2 iterations (256 tokens) in "
        )
    ), runs["resume"][-500:]
    assert runs["full"].splitlines()[-1].startswith(" finished 4 iterations (512 tokens) in ")
    for key in [*logs.metric_names(2), "grad norm", "lm loss validation", "mtp_2 loss validation"]:
        want = by_step(runs["full scalars"], key)
        assert want and by_step(runs["split scalars"], key) == want, key
    assert sorted(by_step(runs["split scalars"], "lm loss")) == [1, 2, 3, 4]
