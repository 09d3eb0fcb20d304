"""Bad input to `python -m mtp_plugin.train` is never silent (issue 10): each case below ends the app with
exit status 2 and one stderr line naming the field or file, before any model exists, leaving nothing
behind (no `outputs/<date>/<time>/`, no checkpoint directory).

The cases run in-process through the app's `main(argv)` with the training loop replaced by a module
whose `run` fails the test, from an empty working directory whose contents are compared before and
after. Two runs go through the real loop: a run without a validation split, and `mtp.num_depths=0`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from train_tiny import (
    EOD,
    REPO,
    TINY_MODEL_OVERRIDES,
    VOCAB,
    repo_env,
    run_app,
    tiny_model_config,
    write_tiny_corpus,
)

from mtp_plugin.train import hydra_app


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _write(prefix: Path, docs: list[list[int]], vocab_size: int = VOCAB) -> str:
    from mtp_plugin.data import write_indexed_dataset

    write_indexed_dataset(prefix, docs, eod_id=EOD, vocab_size=vocab_size)
    return str(prefix)


# --------------------------------------------------------------- files the cases point at (under tmp)


def _empty_pair(tmp: Path, train: str) -> None:
    (tmp / "empty_text_document.bin").write_bytes(b"")
    (tmp / "empty_text_document.idx").write_bytes(b"")


def _empty_bin(tmp: Path, train: str) -> None:
    shutil.copy(train + ".idx", tmp / "nobin_text_document.idx")
    (tmp / "nobin_text_document.bin").write_bytes(b"")


def _truncated_idx(tmp: Path, train: str) -> None:
    shutil.copy(train + ".bin", tmp / "cut_text_document.bin")
    data = Path(train + ".idx").read_bytes()
    (tmp / "cut_text_document.idx").write_bytes(data[: len(data) // 2])


def _garbage_idx(tmp: Path, train: str) -> None:
    shutil.copy(train + ".bin", tmp / "junk_text_document.bin")
    (tmp / "junk_text_document.idx").write_bytes(b"\x89PNG\r\n\x1a\n" * 16)


def _mismatched_pair(tmp: Path, train: str) -> None:
    _write(tmp / "small_text_document", [[1, 2, 3]] * 40)
    shutil.copy(train + ".bin", tmp / "small_text_document.bin")


def _wide_vocab(tmp: Path, train: str) -> None:
    _write(tmp / "wide_text_document", [[5, 700, 9] * 20] * 4, vocab_size=1024)


def _tiny_corpus(tmp: Path, train: str) -> None:
    _write(tmp / "tiny_text_document", [[1, 2, 3, 4, 5, 6, 7, 8, 9]])


def _three_docs(tmp: Path, train: str) -> None:
    # ~240 tokens: Megatron's 969,30,1 split gives the valid split no document, and GPTDataset would
    # loop forever in _get_num_epochs counting epochs of 0 tokens.
    _write(tmp / "three_text_document", [list(range(1, 60)) + list(range(1, 20))] * 3)


def _checkpoint(tmp: Path, *, latest: bytes = b"iter_0000002\n", metadata: bytes | None = None, common=True):
    ckpt = tmp / "old_run" / "iter_0000002"
    ckpt.mkdir(parents=True)
    (tmp / "old_run" / "latest").write_bytes(latest)
    if metadata is None:
        metadata = json.dumps({"sharded_backend": "torch_dist", "common_backend": "torch"}).encode()
    (ckpt / "metadata.json").write_bytes(metadata)
    if common:
        (ckpt / "common.pt").write_bytes(b"\0" * 64)


def _no_latest(tmp: Path, train: str) -> None:
    (tmp / "old_run").mkdir()


def _one_checkpoint_dir(tmp: Path, train: str) -> None:
    _checkpoint(tmp)


def _garbage_latest(tmp: Path, train: str) -> None:
    _checkpoint(tmp, latest=b"\xff\xfe\x00garbage")


def _latest_names_nothing(tmp: Path, train: str) -> None:
    _checkpoint(tmp, latest=b"iter_0000009\n")


def _garbage_metadata(tmp: Path, train: str) -> None:
    _checkpoint(tmp, metadata=b"\x80\x04\x95 not json at all")


def _foreign_metadata(tmp: Path, train: str) -> None:
    _checkpoint(tmp, metadata=b'{"format": "something else"}')


def _no_common(tmp: Path, train: str) -> None:
    _checkpoint(tmp, common=False)


def _a_file(tmp: Path, train: str) -> None:
    (tmp / "notes.txt").write_text("a file, not a directory\n")


# (id, overrides, setup, the text the one error line must hold). {tmp}: the case's file folder;
# {train}/{valid}: the tiny corpus.
CASES = [
    # -- keys and values the schema does not have
    ("plus-unknown-key", ["+training.foo=1"], None, "training.foo is not a setting: TrainingConfig"),
    ("unknown-key", ["training.foo=1"], None, "training.foo is not a setting: TrainingConfig"),
    ("unknown-top-level-key", ["+foo=1"], None, "foo is not a setting: ExperimentConfig"),
    ("typo-suggests-field", ["model.num_layrs=3"], None, "did you mean model.num_layers?"),
    ("unknown-nested-key", ["++mtp.lambda_schedule.bar=1"], None, "mtp.lambda_schedule.bar is not a setting"),
    ("wrong-type", ["model.num_layers=abc"], None, "model.num_layers=abc: Value 'abc'"),
    ("unknown-group-option", ["model=huge"], None, "model=huge is not a shipped option"),
    ("unknown-experiment", ["experiment=nope"], None, "experiment=nope is not a shipped option"),
    # -- values out of range, groups that do not fit
    ("negative-lr", ["training.lr=-1"], None, "training.lr must be > 0"),
    # -- numbers that are not (issue 21): NaN passes every `<` check, inf every `>`
    ("nan-weight-decay", ["training.weight_decay=nan"], None, "training.weight_decay=nan must be a finite"),
    ("infinite-lr", ["training.lr=inf"], None, "training.lr=inf must be a finite number"),
    (
        "adam-beta1-above-1",
        ["training.adam_beta1=1.5"],
        None,
        "training.adam_beta1 must be in [0, 1), got 1.5",
    ),
    ("adam-beta2-is-1", ["training.adam_beta2=1"], None, "training.adam_beta2 must be in [0, 1), got 1.0"),
    ("adam-eps-zero", ["training.adam_eps=0"], None, "training.adam_eps must be > 0"),
    ("nan-init-std", ["model.init_method_std=nan"], None, "model.init_method_std=nan must be a finite"),
    (
        "negative-peak-tflops",
        ["training.peak_tflops_per_device=-1"],
        None,
        "peak_tflops_per_device must be >= 0",
    ),
    ("lr-decay-style", ["training.lr_decay_style=step"], None, "training.lr_decay_style='step'"),
    ("batch-split", ["training.global_batch_size=6", "training.micro_batch_size=4"], None, "multiple of"),
    ("eval-without-iters", ["training.eval_interval=5", "training.eval_iters=0"], None, "eval_iters >= 1"),
    ("negative-save-interval", ["training.save_interval=-1"], None, "training.save_interval must be >= 0"),
    ("seq-length-zero", ["model.seq_length=0"], None, "model.seq_length must be >= 1"),
    ("heads-vs-hidden", ["model.num_attention_heads=3"], None, "model.hidden_size=32 must be divisible"),
    ("topk-above-experts", ["model.moe_router_topk=8"], None, "model.moe_router_topk=8 must be in [1"),
    (
        "experts-vs-ep",
        ["parallel.expert_model_parallel_size=3"],
        None,
        "model.num_experts=4 is not divisible",
    ),
    ("eod-outside-vocab", ["data.eod_id=600"], None, "data.eod_id=600 is outside the vocabulary"),
    ("depths-vs-seq-length", ["mtp.num_depths=32"], None, "mtp.num_depths=32 must be below"),
    ("depth-weights-sum", ["mtp.depth_weights=[0.5,0.2]"], None, "mtp.depth_weights must sum to 1"),
    ("depth-weights-without-mtp", ["mtp=off", "mtp.depth_weights=[1.0]"], None, "with mtp.num_depths=0"),
    ("lambda-kind", ["mtp.lambda_schedule.kind=exponential"], None, "mtp.lambda_schedule.kind='exponential'"),
    # -- a λ schedule carries only the fields of its kind (every kind x field: tests/train/test_presets.py)
    (
        "constant-lambda-with-boundaries",
        ["mtp.lambda_schedule.boundaries_tokens=[100]"],
        None,
        "error: mtp.lambda_schedule.boundaries_tokens=[100.0] is not used by kind='constant' (a constant λ "
        "takes only value); set mtp.lambda_schedule.boundaries_tokens=null, or kind=piecewise, which uses it",
    ),
    (
        "piecewise-lambda-with-value",
        ["mtp=deepseek_v3", "mtp.lambda_schedule.value=0.2"],
        None,
        "error: mtp.lambda_schedule.value=0.2 is not used by kind='piecewise'",
    ),
    (
        "kind-changed-keeps-the-old-value",
        ["mtp.lambda_schedule.kind=linear", "mtp.lambda_schedule.end_tokens=1000"],
        None,
        "error: mtp.lambda_schedule.value=0.1 is not used by kind='linear'",
    ),
    # -- DeepSeek-shaped models: MLA dimensions, RoPE, routing, recompute (the planner refuses them alike)
    (
        "mla-latent-wider-than-hidden",
        ["model.multi_latent_attention=true", "model.kv_lora_rank=64"],
        None,
        "model.kv_lora_rank=64 exceeds model.hidden_size=32",
    ),
    ("yarn-without-mla", ["model.rope_type=yarn"], None, "needs model.multi_latent_attention=true"),
    (
        "expert-bias-with-softmax",
        ["model.moe_router_enable_expert_bias=true"],
        None,
        "needs model.moe_router_score_function=sigmoid",
    ),
    (
        "router-groups-vs-experts",
        ["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
        None,
        "model.moe_router_num_groups=3 must divide model.num_experts=4",
    ),
    ("recompute-without-method", ["parallel.recompute_granularity=full"], None, "parallel.recompute_method"),
    ("layers-vs-stages", ["parallel=pp2", "model.num_layers=3"], None, "model.num_layers=3 cannot be split"),
    (
        "mtp-stage-out-of-range",
        ["parallel=pp2", "mtp.placement=stage", "mtp.mtp_stage=5"],
        None,
        "mtp_stage=5",
    ),
    ("world-size", ["parallel=pp2"], None, "world size 1 is not divisible"),
    ("clip-grad-on-cpu", ["training.clip_grad=1.0"], None, "set training.clip_grad=0 on CPU"),
    ("bf16-on-cpu", ["backend.params_dtype=bfloat16"], None, "bfloat16 needs a GPU"),
    ("bad-job-in-sweep", ["--multirun", "training.lr=1e-3,-1"], None, "training.lr must be > 0"),
    # --config-name skips the preflight: the task rejects it inside hydra.main and removes the run dir
    (
        "checked-inside-hydra-main",
        ["--config-name=config", "training.lr=-1"],
        None,
        "training.lr must be > 0",
    ),
    # -- data
    (
        "missing-prefix",
        ["data=indexed", "data.train_prefix=null", "data.valid_prefix=null"],
        None,
        "set data.prefix=",
    ),
    (
        "missing-data",
        ["data.train_prefix={tmp}/nothing_text_document"],
        None,
        "nothing_text_document.bin does not",
    ),
    (
        "prefix-with-extension",
        ["data.train_prefix={train}.bin"],
        None,
        "give the prefix without the extension",
    ),
    ("prefix-is-a-directory", ["data.train_prefix={tmp}"], None, "is a directory; give the prefix"),
    (
        "missing-valid-split",
        ["data.valid_prefix={tmp}/v_text_document"],
        None,
        "data.valid_prefix=null trains",
    ),
    (
        "empty-bin-and-idx",
        ["data.train_prefix={tmp}/empty_text_document"],
        _empty_pair,
        "shorter than an index",
    ),
    (
        "empty-bin",
        ["data.train_prefix={tmp}/nobin_text_document"],
        _empty_bin,
        "nobin_text_document.bin is 0 bytes",
    ),
    ("truncated-idx", ["data.train_prefix={tmp}/cut_text_document"], _truncated_idx, "truncated or damaged"),
    ("garbage-idx", ["data.train_prefix={tmp}/junk_text_document"], _garbage_idx, "is not a Megatron index"),
    ("bin-idx-mismatch", ["data.train_prefix={tmp}/small_text_document"], _mismatched_pair, "does not match"),
    (
        "vocab-below-token-ids",
        ["data.train_prefix={tmp}/wide_text_document"],
        _wide_vocab,
        "holds token id 700",
    ),
    (
        "corpus-below-one-sample",
        ["data.train_prefix={tmp}/tiny_text_document"],
        _tiny_corpus,
        "fewer than one",
    ),
    (
        "split-without-valid-documents",
        [
            "data=indexed",
            "data.prefix={tmp}/three_text_document",
            "data.train_prefix=null",
            "data.valid_prefix=null",
        ],
        _three_docs,
        "the valid split holds 0 tokens (0 of 3 documents)",
    ),
    # -- checkpoints and output directories
    ("load-dir-missing", ["training.load_dir={tmp}/old_run"], None, "old_run does not exist"),
    ("load-dir-without-checkpoint", ["training.load_dir={tmp}/old_run"], _no_latest, "holds no checkpoint"),
    (
        "load-dir-is-one-checkpoint",
        ["training.load_dir={tmp}/old_run/iter_0000002"],
        _one_checkpoint_dir,
        "is one",
    ),
    ("garbage-latest", ["training.load_dir={tmp}/old_run"], _garbage_latest, "does not name a checkpoint"),
    (
        "latest-names-nothing",
        ["training.load_dir={tmp}/old_run"],
        _latest_names_nothing,
        "missing or unfinished",
    ),
    (
        "garbage-metadata-json",
        ["training.load_dir={tmp}/old_run"],
        _garbage_metadata,
        "metadata.json is not JSON",
    ),
    ("foreign-metadata-json", ["training.load_dir={tmp}/old_run"], _foreign_metadata, "no sharded_backend"),
    ("checkpoint-without-common", ["training.load_dir={tmp}/old_run"], _no_common, "common.pt is missing"),
    (
        "frozen-trunk-without-checkpoint",
        ["mtp.trunk_gradients=frozen", "training.load_dir=null"],
        None,
        "set training.pretrained_checkpoint=DIR",
    ),
    (
        "pretrained-checkpoint-missing",
        ["training.pretrained_checkpoint={tmp}/trained"],
        None,
        "training.pretrained_checkpoint: ",
    ),
    ("unknown-trunk-gradients", ["mtp.trunk_gradients=partly"], None, "use one of joint, detached, frozen"),
    (
        "frozen-with-zero-lambda",
        ["mtp.trunk_gradients=frozen", "mtp.lambda_schedule.value=0"],
        None,
        "nothing would train",
    ),
    (
        "unwritable-save-dir",
        ["training.save_dir=/proc/mtp_ckpt", "training.load_dir=null"],
        None,
        "cannot write",
    ),
    (
        "save-dir-under-a-file",
        ["training.save_dir={tmp}/notes.txt/ckpt"],
        _a_file,
        "is a file, not a directory",
    ),
    (
        "unwritable-tensorboard-dir",
        ["training.tensorboard_dir=/proc/mtp_tb"],
        None,
        "training.tensorboard_dir",
    ),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_there_are_at_least_25_distinct_bad_inputs():
    assert len({case[0] for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize(("overrides", "setup", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_the_model_leaving_nothing(
    overrides, setup, needle, corpus, tmp_path, monkeypatch, capsys
):
    train, valid = corpus
    files = tmp_path / "files"
    files.mkdir()
    if setup:
        setup(files, train)
    cases = [o.format(tmp=files, train=train, valid=valid) for o in overrides]
    argv = [
        *(o for o in cases if o.startswith("-")),  # Hydra's flags before its overrides
        *TINY_MODEL_OVERRIDES,
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        "training.train_iters=2",
        "training.lr_warmup_iters=0",
        *(o for o in cases if not o.startswith("-")),
    ]
    work = tmp_path / "work"  # the launch directory: Hydra would put outputs/ here
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    loop = types.ModuleType("mtp_plugin.train.loop")

    def run(_experiment):
        raise AssertionError("the configuration passed every check and the model was about to be built")

    loop.run = run
    monkeypatch.setitem(sys.modules, "mtp_plugin.train.loop", loop)

    with pytest.raises(SystemExit) as exit_info:
        hydra_app.main(argv)

    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    if any(o.startswith(("data.prefix={", "data.train_prefix={", "data.valid_prefix={")) for o in overrides):
        # A damaged or unusable dataset is named by its field as well as its file.
        assert lines[0].startswith("error: data."), lines[0]
    assert "Traceback" not in err and "building the model" not in out
    assert _tree(tmp_path) == before  # no outputs/<date>/<time>/, no checkpoints, no probe file


def test_num_depths_zero_is_exactly_mtp_off():
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir

    hydra_app.register_configs()
    with initialize_config_dir(config_dir=str(hydra_app.CONFIG_DIR), version_base="1.3"):
        off = hydra_app.to_experiment(compose("config", overrides=["mtp=off"])).mtp
        zero = hydra_app.to_experiment(
            compose("config", overrides=["experiment=toy_demo", "mtp.num_depths=0"])
        ).mtp
    assert asdict(zero) == asdict(off)
    assert (off.num_depths, off.lambda_schedule.kind, off.lambda_schedule.value) == (0, "constant", 0.0)


def test_prepare_with_valid_fraction_zero_writes_no_valid_split(tmp_path):
    pytest.importorskip("tokenizers")
    from mtp_plugin.data import prepare_corpus

    text = tmp_path / "one.txt"
    text.write_text("A single short document, so there is nothing to hold out.\n" * 20)
    lines: list[str] = []
    manifest = prepare_corpus(tmp_path / "out", [text], valid_fraction=0, log=lines.append)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "train_text_document.bin",
        "train_text_document.idx",
    ]
    assert set(manifest["splits"]) == {"train"}
    assert any("data.valid_prefix=null" in line for line in lines)
    # Re-running with the same inputs finds it up to date (the manifest names only the train split).
    again: list[str] = []
    prepare_corpus(tmp_path / "out", [text], valid_fraction=0, log=again.append)
    assert again == [f"{tmp_path / 'out'}: up to date"]


@pytest.mark.megatron
def test_a_run_without_a_valid_split_trains_and_says_so(corpus, tmp_path):
    """An empty valid split (what `prepare --valid-fraction 0` wrote before) turns evaluation off."""
    train, _ = corpus
    empty_valid = _write(tmp_path / "empty_valid_text_document", [])
    proc = run_app(
        *TINY_MODEL_OVERRIDES,
        f"data.train_prefix={train}",
        f"data.valid_prefix={empty_valid}",
        "mtp.num_depths=0",
        "training.train_iters=2",
        "training.lr_warmup_iters=0",
        "training.eval_interval=1",
        "training.log_interval=1",
        "training.progress_bar=off",
        "training.save_dir=null",
        "training.load_dir=null",
        "training.tensorboard_dir=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"no validation: data.valid_prefix={empty_valid} holds no documents" in proc.stdout
    assert "validation loss" not in proc.stdout
    assert "finished 2 iterations" in proc.stdout
    # mtp.num_depths=0 is mtp=off: λ is logged as the 0 it is, not the schedule of a disabled MTP.
    assert "mtp lambda: 0.000000E+00" in proc.stdout and "mtp_1 loss" not in proc.stdout


@pytest.mark.megatron
@pytest.mark.timeout(120)
def test_default_split_of_a_small_corpus_builds(tmp_path):
    """60 documents under 969,30,1 leave the test split empty; Megatron's GPTDataset used to loop
    forever counting its epochs. The test split is never read, so it is not built."""
    from mtp_plugin.config import DataConfig, TrainingConfig
    from mtp_plugin.train.data import build_datasets, check_datasets

    train, _ = write_tiny_corpus(tmp_path, num_docs=60)
    data = DataConfig(prefix=train, split="969,30,1", eod_id=EOD, cache_dir=str(tmp_path / "cache"))
    model = tiny_model_config()
    assert check_datasets(data, model) == []
    training = TrainingConfig(train_iters=2, global_batch_size=4, micro_batch_size=2, lr_warmup_iters=0)
    train_ds, valid_ds = build_datasets(data, model, training, seed=1)
    assert len(train_ds) >= 8 and len(valid_ds) >= 4


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("+training.foo=1", "error: training.foo is not a setting"),
        # Before (issue 21): a 27-line torch traceback from the optimizer, and a run directory left behind.
        (
            "training.weight_decay=nan",
            "error: training.weight_decay=nan must be a finite number; set a real value",
        ),
    ],
)
def test_the_real_process_exits_2_with_one_line_and_no_run_directory(override, line, corpus, tmp_path):
    """The same through `python -m mtp_plugin.train` from an empty launch directory: the exit status
    the shell sees, and no outputs/<date>/<time>/ (Hydra's default run directory) afterwards."""
    train, valid = corpus
    proc = run_app(f"data.train_prefix={train}", override, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]
    ] and proc.stderr.startswith(line), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_settings_that_train_but_are_probably_not_meant_are_warned_about():
    """Issue 21: `mtp.num_depths=100` at sequence 128 ran without a word and did not finish an iteration in
    120 s; λ > 1 was accepted silently while λ < 0 is refused. Both train, with a warning at launch."""
    experiment = lambda *overrides: hydra_app.compose_experiment(["experiment=toy_demo", *overrides])
    assert hydra_app.mtp_notices(experiment()) == []
    (depths,) = hydra_app.mtp_notices(experiment("mtp.num_depths=100"))
    assert depths.startswith(
        "warning: mtp.num_depths=100 costs x91.5 the FLOPs per token of next-token training"
    )
    (lam,) = hydra_app.mtp_notices(experiment("mtp=d1", "mtp.lambda_schedule.value=2"))
    assert lam == (
        "warning: λ reaches 2 (mtp.lambda_schedule): the MTP depths outweigh the next-token loss (DeepSeek-V3: "
        "0.3, then 0.1); λ > 1 is allowed, λ < 0 is refused"
    )
    with pytest.raises(hydra_app.ConfigError, match="must be a finite λ >= 0"):
        experiment("mtp=d1", "mtp.lambda_schedule.value=-0.5")


@pytest.mark.distributed
def test_a_refusal_under_torchrun_is_one_line_and_one_exit_code(tmp_path):
    """Two ranks refuse the same configuration: rank 0 prints the line once, every rank exits 2, and the
    last line torchrun prints is that line (its summary's root cause), not a pointer to torch's docs."""
    proc = run_app(
        "training.train_iters=4", "training.lr_warmup_iters=10", f"hydra.run.dir={tmp_path / 'run'}", nproc=2
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code when a worker failed
    message = "error: training.lr_warmup_iters=10 must be below training.train_iters=4; shorten the warmup"
    lines = proc.stderr.splitlines()
    assert lines.count(message) == 1, proc.stderr[-3000:]
    codes = [line.split(":")[1].split()[0] for line in lines if line.strip().startswith("exitcode")]
    assert codes and set(codes) == {"2"}, proc.stderr[-3000:]
    assert lines[-2] == f"  traceback : {message}" and set(lines[-1]) == {"="}, proc.stderr[-3000:]
    assert "To enable traceback" not in proc.stderr and "Signal 15" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _torchrun_rank_1_stopped_while_checking(
    args: list[str], tmp_path
) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m mtp_plugin.train ARGS` as torchrun's rank 1 that torchrun stops (SIGTERM) before its own
    checks are done, as when rank 0 refused first: the signal arrives while the process still imports."""
    env = {
        "TORCHELASTIC_RUN_ID": "held",
        "RANK": "1",
        "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtp_plugin.train", f"hydra.run.dir={tmp_path / 'run'}", *args],
        cwd=REPO,
        env=repo_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    # Signalled as soon as the process holds SIGTERM (a caught signal in its /proc status), which must be
    # before the app's imports: torch is not loaded yet.
    while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() - start < 60:
        time.sleep(0.005)
    try:
        loaded = Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:  # it ended without ever catching SIGTERM: the exit code says how
        loaded = ""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "libtorch" not in loaded, "SIGTERM first caught after torch loaded: one during the imports kills"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def test_a_rank_stopped_before_it_reached_the_refusal_exits_2_at_once(tmp_path):
    """Before: such a rank died of the signal (-15 in torchrun's summary, beside rank 0's exit 2)."""
    from mtp_plugin.train.hydra_app import TORCHRUN_REFUSAL_WAIT_S

    proc, took = _torchrun_rank_1_stopped_while_checking(
        ["training.train_iters=4", "training.lr_warmup_iters=10"], tmp_path
    )
    message = "error: training.lr_warmup_iters=10 must be below training.train_iters=4; shorten the warmup"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert took < TORCHRUN_REFUSAL_WAIT_S  # it did not wait to be stopped a second time
    assert json.loads((tmp_path / "error.json").read_text())["message"] == message
    assert message not in proc.stderr  # rank 0 prints it
    assert not (tmp_path / "run").exists()


def test_a_rank_stopped_while_checking_an_accepted_launch_dies_of_the_signal(tmp_path):
    """The held signal is delivered once the checks pass, with its default action: nothing is started."""
    proc, _ = _torchrun_rank_1_stopped_while_checking(["experiment=toy_demo", "--cfg", "job"], tmp_path)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert not (tmp_path / "error.json").exists()
