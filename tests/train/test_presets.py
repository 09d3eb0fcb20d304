"""A group chosen on the command line wins over an experiment preset (issue 16): for every shipped preset
and every shipped `mtp/` option, read from the files (a new preset or option is covered without editing
this test), `experiment=<preset> mtp=<option>` composes exactly what `mtp=<option>` composes; a preset
only chooses group options; a λ schedule carrying a field of another kind is a one-line error naming
the field; `--cfg job` prints the one-line MTP summary above the config.

Composition is Hydra's own (`hydra.compose` under the shipped config directory), as the app does.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtp_plugin.config import LambdaScheduleConfig
from mtp_plugin.config.mtp import first_iteration_at
from mtp_plugin.core.schedules import SCHEDULE_FIELDS, schedule_from_state_dict
from mtp_plugin.train import hydra_app

GROUPS = hydra_app.group_options()
PRESETS = GROUPS["experiment"]
MTP_OPTIONS = GROUPS["mtp"]
TABLE = [(preset, option) for preset in PRESETS for option in MTP_OPTIONS]


@pytest.fixture(scope="module")
def hydra_compose():
    """compose(*overrides) under the shipped configs (Hydra is initialised per call: the app's main,
    tested below, initialises it itself)."""
    hydra_app.register_configs()

    def _compose(*overrides: str, hydra: bool = False):
        with initialize_config_dir(config_dir=str(hydra_app.CONFIG_DIR), version_base="1.3"):
            return compose(hydra_app.CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra)

    return _compose


@pytest.fixture(scope="module")
def option_alone(hydra_compose):
    """{option: the `mtp` node `mtp=<option>` composes without a preset, interpolations unresolved}."""
    return {o: OmegaConf.to_container(hydra_compose(f"mtp={o}").mtp, resolve=False) for o in MTP_OPTIONS}


def test_the_table_covers_the_shipped_files():
    assert len(PRESETS) >= 3 and {"toy_demo", "small_h100", "smoke_gpu"} <= set(PRESETS)
    assert len(MTP_OPTIONS) >= 5 and {"off", "d1", "d2", "d3", "deepseek_v3"} <= set(MTP_OPTIONS)


@pytest.mark.parametrize(("preset", "option"), TABLE, ids=[f"{p}-mtp={o}" for p, o in TABLE])
def test_the_mtp_option_on_the_command_line_wins_over_the_preset(preset, option, hydra_compose, option_alone):
    cfg = hydra_compose(f"experiment={preset}", f"mtp={option}")
    # Exactly the option's node: no field of the preset's own mtp choice or of its body survives.
    assert OmegaConf.to_container(cfg.mtp, resolve=False) == option_alone[option]
    mtp = hydra_app.to_experiment(cfg).mtp
    assert mtp.num_depths == option_alone[option]["num_depths"]
    assert mtp.lambda_schedule.kind == option_alone[option]["lambda_schedule"]["kind"]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_only_chooses_group_options(preset, hydra_compose, option_alone):
    """Its body sets no field of any group (a group's settings live in the option it selects), and
    `experiment=<preset>` alone composes its mtp choice exactly."""
    body = OmegaConf.to_container(OmegaConf.load(hydra_app.CONFIG_DIR / "experiment" / f"{preset}.yaml"))
    assert not set(body) & set(GROUPS), (
        f"experiment/{preset}.yaml sets {sorted(set(body) & set(GROUPS))} itself"
    )
    cfg = hydra_compose(f"experiment={preset}", hydra=True)
    assert OmegaConf.to_container(cfg.mtp, resolve=False) == option_alone[cfg.hydra.runtime.choices.mtp]
    assert cfg.name == preset


def test_a_preset_that_sets_a_group_itself_is_refused_when_that_group_is_chosen(tmp_path):
    """A user's preset written the old way (a group body) is refused instead of silently merged."""
    configs = tmp_path / "hydra_configs"
    shutil.copytree(hydra_app.CONFIG_DIR, configs)
    (configs / "experiment" / "mine.yaml").write_text("# @package _global_\nmtp:\n  num_depths: 3\n")
    with pytest.raises(hydra_app.ConfigError) as err:
        hydra_app.preflight(["experiment=mine", "mtp=off"], config_dir=configs)
    assert err.value.message.startswith("error: experiment=mine sets mtp.num_depths itself"), (
        err.value.message
    )


# --------------------------------------------------------------- a schedule carries only its kind's fields

_SAMPLE = {"boundaries_tokens": [100.0], "values": [0.3, 0.1]}
STRAY = [
    (kind, name)
    for kind in SCHEDULE_FIELDS
    for name in (f.name for f in dataclasses.fields(LambdaScheduleConfig))
    if name != "kind" and name not in SCHEDULE_FIELDS[kind]
]


@pytest.mark.parametrize(("kind", "name"), STRAY, ids=[f"{k}+{n}" for k, n in STRAY])
def test_a_field_of_another_kind_is_an_error_naming_it(kind, name):
    value = _SAMPLE.get(name, 0.5)
    with pytest.raises(ValueError) as err:
        LambdaScheduleConfig(kind=kind, **{name: value})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"mtp.lambda_schedule.{name}={value} is not used by kind={kind!r}"), message
    assert f"set mtp.lambda_schedule.{name}=null" in message
    # The fix names the kinds that do use it.
    assert all(k in message for k, names in SCHEDULE_FIELDS.items() if name in names), message


def test_an_empty_list_of_another_kind_is_set_too():
    with pytest.raises(ValueError, match=r"^mtp.lambda_schedule.values=\[\] is not used by kind='constant'"):
        LambdaScheduleConfig(kind="constant", value=0.2, values=[])


def test_each_kind_builds_from_its_own_fields_only():
    assert LambdaScheduleConfig().build()(0) == 0.1  # Megatron's mtp_loss_scaling_factor default
    piecewise = LambdaScheduleConfig(kind="piecewise", boundaries_tokens=[5], values=[0.3, 0.1]).build()
    assert (piecewise(4), piecewise(5)) == (0.3, 0.1)
    ramp = LambdaScheduleConfig(kind="linear", start_value=1.0, end_value=0.0, end_tokens=10).build()
    assert (ramp(0), ramp(5), ramp(10)) == (1.0, 0.5, 0.0)


def test_a_checkpointed_schedule_with_a_stray_field_is_refused_naming_it():
    with pytest.raises(ValueError, match="kind 'constant' has boundaries_tokens, which a constant schedule"):
        schedule_from_state_dict({"kind": "constant", "value": 0.1, "boundaries_tokens": [1.0]})


# --------------------------------------------------------------- the one-line MTP summary


@pytest.mark.parametrize("tokens_per_iteration", [1, 128, 1000])
@pytest.mark.parametrize("boundary", [0.0, 1.0, 127.0, 128.0, 129.0, 1706.75, 5000.0])
def test_the_switch_iteration_is_the_first_whose_lambda_changed(boundary, tokens_per_iteration):
    """Iteration i is weighted by λ(tokens consumed before it) = λ((i - 1) * tokens_per_iteration)."""
    schedule = LambdaScheduleConfig(kind="piecewise", boundaries_tokens=[boundary], values=[0.3, 0.1]).build()
    i = first_iteration_at(boundary, tokens_per_iteration)
    assert schedule((i - 1) * tokens_per_iteration) == 0.1
    assert i == 1 or schedule((i - 2) * tokens_per_iteration) == 0.3


def test_the_summary_says_depth_schedule_in_tokens_and_iterations_and_loss_path(hydra_compose):
    toy = hydra_app.to_experiment(hydra_compose("experiment=toy_demo"))
    tokens = 100 * 8 * 128 * 0.6667  # train_iters x global batch x sequence x 2/3
    iteration = math.ceil(tokens / (8 * 128)) + 1
    assert toy.mtp_summary() == (
        f"MTP D = 2 (w_k = 1/D), λ 0.3, then 0.1 from {tokens:,.0f} tokens (iteration {iteration} of 100); "
        "depth loss chunked (fused head + cross-entropy, 4096-token chunks)"
    )
    plain = hydra_app.to_experiment(
        hydra_compose("mtp=d1", "mtp.loss_chunk_tokens=0", "mtp.lambda_schedule.value=0.25")
    )
    assert plain.mtp_summary() == (
        "MTP D = 1 (w_k = 1/D), λ 0.25 (constant); depth loss plain (full [tokens x vocab] logits per depth)"
    )
    late = hydra_app.to_experiment(hydra_compose("mtp=deepseek_v3")).mtp_summary()
    assert "then 0.1 from 10,000,000,000,000 tokens (iteration 9,765,625,001 after the run's 100)" in late


def test_cfg_job_prints_the_summary_and_exactly_the_chosen_group(capsys):
    """What the issue ran: `experiment=small_h100 mtp=off --cfg job` (the app's main, Hydra's --cfg)."""
    hydra_app.main(["experiment=small_h100", "mtp=off", "--cfg", "job"])
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first == "# MTP off (D = 0): next-token loss only, λ 0"
    shown = OmegaConf.create("\n".join(rest))
    assert shown.name == "small_h100" and shown.model.num_layers == 8
    assert shown.mtp.num_depths == 0 and shown.mtp.lambda_schedule.kind == "constant"
    assert shown.mtp.lambda_schedule.value == 0.0 and shown.mtp.lambda_schedule.boundaries_tokens is None


def test_cfg_job_of_a_refused_configuration_is_the_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hydra_app.main(["mtp=deepseek_v3", "mtp.lambda_schedule.value=0.2", "--cfg", "job"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.strip() == (
        "error: mtp.lambda_schedule.value=0.2 is not used by kind='piecewise' (a piecewise λ takes only "
        "boundaries_tokens, values); set mtp.lambda_schedule.value=null, or kind=constant, which uses it"
    )
