"""Placement planning and its errors: pure functions, checked before any process group exists."""

import pytest

from mtp_plugin.config import ModelConfig, MTPConfig, ParallelConfig
from mtp_plugin.megatron.config import check_supported
from mtp_plugin.megatron.placement import parse_layout, plan_pipeline


def test_last_placement_uses_megatrons_default_split():
    plan = plan_pipeline(num_layers=4, num_depths=2, pipeline_size=2)
    assert plan.layout is None and plan.mtp_stage == 1
    assert plan.stages == ("Ett", "ttmmL")
    assert plan.embedding_stages == (0, 1)


def test_single_stage():
    plan = plan_pipeline(num_layers=3, num_depths=1, pipeline_size=1)
    assert plan.stages == ("Etttm" + "L",) and plan.mtp_stage == 0 and plan.embedding_stages == (0,)


def test_stage_placement_with_loss_only_stage():
    plan = plan_pipeline(num_layers=4, num_depths=2, pipeline_size=3, placement="stage", mtp_stage=1)
    assert plan.layout == "Ett|ttmm|L"
    assert plan.embedding_stages == (0, 1)
    assert plan.embedding_ranks_fn(tied_head=False)([10, 11, 12]) == [10, 11]
    assert plan.embedding_ranks_fn(tied_head=True)([10, 11, 12]) == [10, 11, 12]


def test_stage_equal_to_last_is_last():
    assert (
        plan_pipeline(num_layers=4, num_depths=1, pipeline_size=2, placement="stage", mtp_stage=1).layout
        is None
    )


def test_explicit_layout_mtp_on_its_own_stage():
    plan = plan_pipeline(num_layers=4, num_depths=3, pipeline_size=3, layout="Et*2|t*2|m*3L")
    assert plan.stages == ("Ett", "tt", "mmmL") and plan.mtp_stage == 2


@pytest.mark.parametrize(
    ("pp", "depths", "stages"),
    [
        (3, 2, ("Ett", "ttm", "mL")),  # one depth per stage after the trunk
        (4, 3, ("Ett", "ttm", "m", "mL")),
        (3, 3, ("Ett", "ttmm", "mL")),  # more depths than depth stages: the earlier stages take one more
        (2, 2, ("Ett", "ttmmL")),  # one depth stage: `last`
    ],
)
def test_split_placement(pp, depths, stages):
    plan = plan_pipeline(num_layers=4, num_depths=depths, pipeline_size=pp, placement="split")
    assert plan.stages == stages and plan.mtp_stage == 1
    assert plan.is_split == (pp > 2)
    assert [list(plan.depths_on(s)) for s in range(pp)][1:] == [
        list(range(1 + "".join(stages[:s]).count("m"), 1 + "".join(stages[: s + 1]).count("m")))
        for s in range(1, pp)
    ]
    assert plan.embedding_stages == tuple(range(pp))


def test_split_layout_and_what_megatron_gets():
    """Megatron asserts one MTP stage: it gets the same trunk with every depth on the first depth stage."""
    plan = plan_pipeline(num_layers=4, num_depths=3, pipeline_size=4, layout="Et*2|t*2m|m|mL")
    assert plan.stages == ("Ett", "ttm", "m", "mL") and plan.mtp_stage == 1
    assert plan.megatron_layout == "Ett|ttmmm||L"
    assert [list(plan.depths_on(s)) for s in range(4)] == [[], [1], [2], [3]]
    plan = plan_pipeline(num_layers=4, num_depths=2, pipeline_size=4, layout="Et|t|t*2m|mL")
    assert plan.embedding_stages == (0, 2, 3) and plan.megatron_layout == "Et|t|ttmm|L"
    assert plan.embedding_ranks_fn(tied_head=False)([10, 11, 12, 13]) == [10, 12, 13]
    # A split with a loss-only stage after the depths
    plan = plan_pipeline(num_layers=4, num_depths=2, pipeline_size=4, layout="Et*2|t*2m|m|L")
    assert plan.embedding_stages == (0, 1, 2) and plan.depths_on(3) == range(3, 3)
    # Not split: Megatron gets the layout as it is.
    plan = plan_pipeline(num_layers=4, num_depths=2, pipeline_size=3, layout="Ett|ttmm|L")
    assert not plan.is_split and plan.megatron_layout == "Ett|ttmm|L"


def test_parse_layout():
    assert parse_layout("Et*3|t m*2|L") == ("Ettt", "tmm", "L")
    # Megatron's grammar: (...)*n groups, which may span stages, and cosmetic commas.
    assert parse_layout("E(t)*2|L") == ("Ett", "L")
    assert parse_layout("Et*3|(tt|)*2,m|L") == ("Ettt", "tt", "tt", "m", "L")
    with pytest.raises(ValueError, match="cannot read"):
        parse_layout("Et|x|L")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(placement="stage", mtp_stage=3), "stages 0..2"),
        (dict(placement="stage", mtp_stage=0), "cannot run on stage 0"),
        (dict(pipeline_size=4, placement="stage", mtp_stage=1), "without work"),
        (dict(layout="Et*2|mt*2|L"), "before the trunk's last decoder layer"),
        (dict(layout="Et*2|t*2|mL", num_depths=2), "MTP depths 'm' but mtp.num_depths=2"),
        # split: depths over consecutive stages after the trunk's last layer, never on stage 0
        (dict(layout="Et*2|mt*2|mL", num_depths=2), "before the trunk's last decoder layer"),
        (dict(layout="Et*2m|t*2|mL", num_depths=2), "cannot run on stage 0"),
        (dict(layout="Et*4|m|t|mL", num_depths=2, num_layers=5, pipeline_size=4), "before the trunk's last"),
        (dict(layout="Et*4|m||mL", num_depths=2, pipeline_size=4), r"stages \[1, 3\] are not on consecutive"),
        (dict(placement="split", mtp_stage=1, num_depths=1), "more depth stages than depths"),
        (dict(placement="split", mtp_stage=0, num_depths=2), "first depth stage must be in 1..2"),
        (
            dict(placement="split", num_depths=2, num_layers=5),
            "not divisible across 2 stages up to the first",
        ),
        (dict(layout="Et*4||mL", num_depths=1), "stage 1 has no work"),
        (
            dict(layout="Et*4|mL", num_depths=1, pipeline_size=3),
            "2 stages but pipeline_model_parallel_size=3",
        ),
        (dict(layout="mEt*4|L", num_depths=1, pipeline_size=2), "must start with the embedding"),
        (dict(num_layers=5), "not divisible across 3 pipeline stages"),
    ],
)
def test_invalid_placements(kwargs, message):
    args = dict(num_layers=4, num_depths=1, pipeline_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_pipeline(**args)


def test_check_supported_rejects_context_parallel_and_bad_experts():
    model = ModelConfig(num_layers=4, num_experts=8)
    with pytest.raises(ValueError, match="context_parallel_size=1"):
        check_supported(model, ParallelConfig(context_parallel_size=2), MTPConfig(num_depths=1))
    with pytest.raises(
        ValueError, match="num_experts=8 is not divisible by parallel.expert_model_parallel_size=3"
    ):
        check_supported(model, ParallelConfig(expert_model_parallel_size=3), MTPConfig(num_depths=1))
    with pytest.raises(ValueError, match="below the sequence length 4"):
        check_supported(ModelConfig(seq_length=4), ParallelConfig(), MTPConfig(num_depths=4))


def test_placement_module_does_not_import_megatron():
    import subprocess
    import sys

    code = "import sys, mtp_plugin.megatron.placement, mtp_plugin.megatron.config; print('megatron' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"


def test_optional_accelerators_are_detected_not_required(tmp_path, monkeypatch):
    """Reported as importable or not, whatever this machine has installed: apex is shown absent
    (an import of it blocked), then present (a package of that name on sys.path)."""
    import sys

    from mtp_plugin.megatron.compat import optional_accelerators

    monkeypatch.setitem(sys.modules, "apex", None)  # `import apex` fails, as without the package
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert optional_accelerators() == {"apex": False, "transformer_engine": False}
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "apex")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert optional_accelerators() == {"apex": True, "transformer_engine": False}
