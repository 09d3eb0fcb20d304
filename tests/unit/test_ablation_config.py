"""benchmarks/ablation_mtp.py's arms compose (Hydra's compose API) into the ExperimentConfig they claim."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ablation_mtp  # noqa: E402


@pytest.mark.parametrize("arm,depth", [("ntp", 0), ("mtp-d1", 1), ("mtp-d2-flops", 2)])
def test_arm_overrides_compose_to_the_arm(arm, depth):
    from hydra import compose, initialize_config_dir

    from mtp_plugin.train.hydra_app import CONFIG_DIR, CONFIG_NAME, register_configs, to_experiment

    args = ablation_mtp.build_parser().parse_args(["--iters", "30", "--valid-prefix", "some/valid"])
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="test_ablation"):
        cfg = compose(config_name=CONFIG_NAME, overrides=ablation_mtp.overrides_for(arm, 30, args))
    exp = to_experiment(cfg)
    assert exp.mtp.num_depths == depth
    assert exp.data.valid_prefix == "some/valid"
    assert (exp.training.train_iters, exp.training.eval_interval) == (30, 30)
    assert exp.model.hidden_size == 1024  # the `small` model
    schedule = exp.mtp.lambda_schedule.build()
    tokens = 30 * args.global_batch * args.seq
    if depth:
        # DeepSeek-V3's 0.3 -> 0.1, the switch at 2/3 of the arm's own tokens.
        assert (schedule(0), schedule(tokens * 2 // 3 - 1), schedule(tokens * 2 // 3 + 1)) == (0.3, 0.3, 0.1)
    else:
        assert schedule(0) == 0.0
