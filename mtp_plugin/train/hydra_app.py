"""The Hydra layer of `python -m mtp_plugin.train`: schema registration, composition, validation.

Only the entry point imports Hydra. The schema is the plugin's dataclasses (`ExperimentConfig` and the
group dataclasses it holds), registered in Hydra's ConfigStore; the YAML under `hydra_configs/` fills
them. Every check that can fail — an unknown group option or key (with or without `+`), a field out
of range, groups that do not fit each other or the number of processes, a missing, empty, truncated or
too small dataset, a damaged checkpoint, an unwritable output directory — ends the program with one
line naming the field or file and the fix, and exit status 2, before torch.distributed, Megatron's
parallel state or any model exists.

`main` first composes and validates every job with Hydra's compose API (`preflight`), and only then
hands the command line to `hydra.main`, so a rejected configuration leaves no `outputs/<date>/<time>/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtp_plugin.config import ExperimentConfig
from mtp_plugin.train.held_signal import HeldSigterm, is_other_torchrun_rank

# Shipped inside the package (wheels too); the top-level hydra_configs/ of a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "hydra_configs"
CONFIG_NAME = "config"
SCHEMA_NAME = "experiment_schema"


class ConfigError(SystemExit):
    """A user-fixable problem with the configuration or a file it names (data, checkpoint, output
    directory), found before the run starts: exits with status 2 and this one line."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _mul(*factors) -> float:
    product = 1.0
    for factor in factors:
        product *= float(factor)
    return product


def register_configs() -> None:
    """Register the schema and the `mul` resolver (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)
    if not OmegaConf.has_resolver("mul"):
        # `${mul:a,b,...}`: e.g. a λ switch at 2/3 of the run's tokens, written in YAML.
        OmegaConf.register_new_resolver("mul", _mul)


def group_options(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """{group: [option, ...]} as shipped under `config_dir`."""
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(config_dir.iterdir())
        if group.is_dir()
    }


def check_group_overrides(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject `group=option` overrides naming an option that is not shipped, in one line.

    Hydra would report it too, over several lines with its search path; this names the fix.
    """
    options = group_options(config_dir)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in options or value in ("", "null"):
            continue
        for choice in value.split(","):  # --multirun sweeps: model=toy,small
            if choice not in options[key]:
                raise ConfigError(
                    f"error: {key}={choice} is not a shipped option of group '{key}'; choose one of "
                    f"{', '.join(options[key])} (hydra_configs/{key}/)"
                )


def _schema_fields(schema: type) -> dict[str, object]:
    """{field name: type} of a config dataclass, annotations resolved (they are strings here)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _unknown_key(path: list[str], schema: type = ExperimentConfig) -> str | None:
    """A one-line complaint if the dotted `path` is not a field of the schema, else None."""
    for depth, name in enumerate(path):
        fields = _schema_fields(schema)
        if name not in fields:
            where = ".".join(path[:depth]) or "the top level"
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {'.'.join([*path[:depth], close[0]])}? " if close else ""
            return (
                f"error: {'.'.join(path)} is not a setting: {schema.__name__} ({where}) has no field '{name}'; "
                f"{hint}its fields are {', '.join(fields)}"
            )
        if not (isinstance(fields[name], type) and dataclasses.is_dataclass(fields[name])):
            return None  # a leaf (or a list): Hydra and the dataclass check the value
        schema = fields[name]
    return None


def check_override_keys(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject `key=value`, `+key=value` and `++key=value` for keys the schema does not have.

    Hydra refuses an unknown key without `+` over two lines and suggests `+key`, which it then accepts
    and the dataclasses never read; the schema decides instead, with or without the prefix.
    """
    groups = group_options(config_dir)
    for arg in overrides:
        if "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0].split("/")[0] == "hydra" or "/" in key or (key in groups and "." not in key):
            continue  # Hydra's own settings (hydra.run.dir, hydra/launcher=...) or a group choice
        if key.split("@", 1)[0] != key:
            raise ConfigError(
                f"error: {arg}: package overrides (@) are not supported; set fields with key=value"
            )
        message = _unknown_key(key.split("."))
        if message:
            raise ConfigError(message)


def unknown_keys(node: DictConfig, schema: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that the schema does not have (e.g. a typo in a group's YAML)."""
    fields = _schema_fields(schema)
    found = []
    for key in node:
        if key not in fields:
            found.append(f"{prefix}{key}")
        elif isinstance(fields[key], type) and dataclasses.is_dataclass(fields[key]):
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                found += unknown_keys(child, fields[key], f"{prefix}{key}.")
    return found


def check_experiment_overrides(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject `experiment=X group=Y` when X's body sets fields of that group itself.

    A preset's body is merged after the groups, so a body `mtp: {num_depths: 2}` would silently
    override `mtp=off`. Shipped presets only choose group options (tests/train/test_presets.py); this
    catches a preset written the old way.
    """
    choices = {}
    for arg in overrides:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            choices[key.lstrip("+")] = value
    experiment = choices.get("experiment")
    if not experiment or "," in experiment or experiment == "null":
        return
    path = config_dir / "experiment" / f"{experiment}.yaml"
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}
    for group in group_options(config_dir):
        if group in choices and group != "experiment" and isinstance(body.get(group), dict):
            keys = ", ".join(f"{group}.{k}" for k in body[group])
            raise ConfigError(
                f"error: experiment={experiment} sets {keys} itself, which would silently override "
                f"{group}={choices[group]}; override those fields instead (e.g. {group}.{next(iter(body[group]))}=...) "
                f"or leave out experiment={experiment}"
            )


def _one_line(err: BaseException) -> str:
    """The first line of a Hydra/OmegaConf error and of its cause, e.g. 'Error merging override
    model.num_layers=abc: Value 'abc' of type 'str' could not be converted to Integer'."""
    lines = [str(err).strip().splitlines()[0]] if str(err).strip() else [type(err).__name__]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in lines[0]:
            lines.append(first)
    return ": ".join(line.rstrip(".") for line in lines)


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Build the dataclasses from a composed config; a validation error becomes a ConfigError."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(_unknown_key(extra[0].split(".")) or f"error: {extra[0]} is not a setting")
    # OmegaConf.to_object would leave a `???` it cannot fill at the dataclass default instead.
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"error: {missing[0]} is mandatory here (???) and not set; add {missing[0]}=VALUE")
    try:
        experiment = OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"error: {err}") from None
    except OmegaConfBaseException as err:
        # e.g. a mandatory `???` left unset: "Missing mandatory value: data.prefix"
        first = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        raise ConfigError(
            f"error: {first}" + (f" (set {key}=...)" if key and key not in first else "")
        ) from None
    if not isinstance(experiment, ExperimentConfig):
        raise ConfigError(f"error: composed config is a {type(experiment).__name__}, not ExperimentConfig")
    return experiment


def resolve_run_paths(experiment: ExperimentConfig, output_dir: str | os.PathLike) -> None:
    """Relative checkpoint and TensorBoard directories live inside the run's output directory."""
    tr = experiment.training
    for name in ("save_dir", "load_dir", "tensorboard_dir"):
        value = getattr(tr, name)
        if value and not os.path.isabs(value):
            setattr(tr, name, str(Path(output_dir) / value))


def validate_for_launch(
    experiment: ExperimentConfig,
    *,
    world_size: int,
    cuda: bool,
    scan_tokens: bool = True,
    run_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The checks that need the launch: process count, device, the adapter's plan, then files on disk
    (datasets, checkpoints, output directories). Returns notices for the log (e.g. no validation split).

    scan_tokens=False skips the one pass over each `.bin` that finds its largest token id (done once
    already when the app validated the same configuration before Hydra made the run directory).
    """
    try:
        experiment.check_world_size(world_size)
        if not cuda and experiment.backend.params_dtype != "float32":
            raise ValueError(
                "backend.params_dtype=bfloat16 needs a GPU; use backend.params_dtype=float32 on CPU"
            )
        if experiment.backend.name == "deepspeed":
            from mtp_plugin.deepspeed.config import check_experiment

            check_experiment(experiment)
        else:
            _check_megatron_launch(experiment, cuda=cuda)
    except ValueError as err:
        raise ConfigError(f"error: {err}") from None
    # Files last: every configuration error is reported even before the corpus has been prepared.
    try:
        experiment.data.check_files()
        from mtp_plugin.train.data import check_datasets

        notices = check_datasets(experiment.data, experiment.model, scan_tokens=scan_tokens)
        check_checkpoint_dirs(experiment.training, run_dir)
    except (ValueError, OSError) as err:
        raise ConfigError(f"error: {err}") from None
    return notices + mtp_notices(experiment)


# Above this many times the FLOPs per token of next-token training, the MTP depths dominate the run so much
# that the setting is more likely a typo (mtp.num_depths=100) than a plan; the toy model with D = 8: x8.2.
MTP_COST_NOTICE = 8.0


def mtp_notices(experiment: ExperimentConfig) -> list[str]:
    """Settings that train but are probably not meant: λ above 1 (accepted: λ is a loss weight, Megatron's
    mtp_loss_scaling_factor has no bound; only λ < 0 is refused), and MTP depths costing more than
    MTP_COST_NOTICE times next-token training (the planner's FLOPs figure)."""
    from mtp_plugin.accounting.model_flops import token_flops
    from mtp_plugin.core.schedules import peak

    notices = []
    mtp = experiment.mtp
    top = peak(mtp.lambda_schedule.build())
    if mtp.enabled and top > 1:
        notices.append(
            f"warning: λ reaches {top:g} (mtp.lambda_schedule): the MTP depths outweigh the next-token loss "
            "(DeepSeek-V3: 0.3, then 0.1); λ > 1 is allowed, λ < 0 is refused"
        )
    flops = token_flops(experiment.model)
    cost = flops.training(mtp.num_depths) / flops.training(0)
    if cost > MTP_COST_NOTICE:
        notices.append(
            f"warning: mtp.num_depths={mtp.num_depths} costs x{cost:.1f} the FLOPs per token of next-token "
            f"training ({flops.training(mtp.num_depths):.3g} vs {flops.training(0):.3g}; `python -m "
            "mtp_plugin.plan` sizes it); DeepSeek-V3 uses 1 depth"
        )
    return notices


def _check_megatron_launch(experiment: ExperimentConfig, *, cuda: bool) -> None:
    if not cuda and experiment.training.clip_grad > 0:
        raise ValueError(
            f"training.clip_grad={experiment.training.clip_grad}: Megatron's gradient clipping needs CUDA "
            "tensors; set training.clip_grad=0 on CPU (the grad norm is still logged)"
        )
    if not cuda:
        from mtp_plugin.train.cpu import check_cpu_run

        check_cpu_run(experiment.model)
    if not cuda and experiment.backend.use_distributed_optimizer:
        raise ValueError(
            "backend.use_distributed_optimizer=true: Megatron's distributed optimizer shards CUDA tensors "
            "only; set backend.use_distributed_optimizer=false on CPU"
        )
    from mtp_plugin.megatron import check_supported

    check_supported(experiment.model, experiment.parallel, experiment.mtp)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(field: str, value: str) -> None:
    """OSError naming `field` unless `value` is (or can be made) a directory this process can write in.

    Probes with a temporary file in the directory or its nearest existing ancestor, so nothing is left
    behind and an unwritable save directory is found at start, not at the first save.
    """
    path = Path(value)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{field}={value}: {existing} is a file, not a directory; choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".mtp-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{field}={value}: cannot write in {existing} ({err.strerror}); choose a writable directory"
        ) from None


_CHECKPOINT_NAME = re.compile(r"^iter_\d{7}$")


def check_checkpoint(path: Path, pointer: Path) -> None:
    """OSError naming the file unless `path` looks like a finished dist_checkpointing checkpoint (or a
    finished DeepSpeed one: the plugin's marker file, written after every rank's files)."""
    from mtp_plugin.train.checkpoint import DEEPSPEED_MARKER, check_file_sizes

    if path.is_dir():
        check_file_sizes(path)
    marker = path / DEEPSPEED_MARKER
    if marker.is_file():
        try:
            json.loads(marker.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{marker} is not JSON; the checkpoint is damaged: point {pointer} at another iter_* directory"
            ) from None
        return
    metadata = path / "metadata.json"
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{pointer} names {path.name}, but {metadata} does not exist (a missing or unfinished checkpoint); "
            f"point {pointer} at an existing iter_* directory or remove it to start fresh"
        )
    try:
        config = json.loads(metadata.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{metadata} is not JSON ({err.__class__.__name__} at byte/char {getattr(err, 'pos', getattr(err, 'start', '?'))}); the checkpoint is damaged: point {pointer} at another iter_* directory"
        ) from None
    if not isinstance(config, dict) or "sharded_backend" not in config:
        raise ValueError(
            f"{metadata} is not a dist_checkpointing metadata file (no sharded_backend); the checkpoint "
            f"is damaged: point {pointer} at another iter_* directory"
        )
    common = path / "common.pt"
    # megatron-core >= 0.19 keeps the common state inside the torch_dist files (no "common_backend").
    if "common_backend" in config and (not common.is_file() or common.stat().st_size == 0):
        raise FileNotFoundError(
            f"{common} is missing or empty; the checkpoint is damaged: point {pointer} at another iter_* directory"
        )


def check_checkpoint_dirs(training, run_dir: str | os.PathLike | None = None) -> None:
    """The checkpoint and output directories of a run, before any process group or model exists.

    A load_dir equal to save_dir or inside the run directory (the shipped default: both are the run's
    `checkpoints/`) resumes when it holds a `latest` pointer and starts fresh otherwise; any other
    load_dir is a checkpoint to start from, so it must hold one.
    """
    from mtp_plugin.train.checkpoint import LATEST

    tr = training
    if tr.load_dir:
        load = Path(tr.load_dir)
        inside_run = run_dir is not None and Path(run_dir).absolute() in load.absolute().parents
        required = tr.load_dir != tr.save_dir and not inside_run
        pointer = load / LATEST
        if load.exists() and not load.is_dir():
            raise NotADirectoryError(
                f"training.load_dir={tr.load_dir} is a file; point it at a checkpoint directory"
            )
        if required and not load.is_dir():
            raise FileNotFoundError(
                f"training.load_dir={tr.load_dir} does not exist; point it at a save_dir that holds a `latest` "
                "checkpoint, or set training.load_dir=null to start fresh"
            )
        if load.is_dir() and not pointer.is_file():
            if (load / "metadata.json").is_file():
                raise FileNotFoundError(
                    f"training.load_dir={tr.load_dir} is one checkpoint; point it at the directory above it "
                    f"(the one holding `{LATEST}`)"
                )
            if required:
                raise FileNotFoundError(
                    f"training.load_dir={tr.load_dir} holds no checkpoint ({pointer} does not exist); point it "
                    "at a save_dir of an earlier run, or set training.load_dir=null to start fresh"
                )
        if pointer.is_file():
            try:
                name = pointer.read_text().strip()
            except UnicodeDecodeError:
                name = ""
            if not _CHECKPOINT_NAME.match(name):
                raise ValueError(
                    f"{pointer} does not name a checkpoint (expected one line like iter_0000020); write the "
                    f"name of an existing iter_* directory into it, or remove it to start fresh"
                )
            check_checkpoint(load / name, pointer)
    if tr.pretrained_checkpoint:
        from mtp_plugin.train.checkpoint import finished_checkpoint

        try:
            finished_checkpoint(tr.pretrained_checkpoint)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"training.pretrained_checkpoint: {err}") from None
    for field in ("save_dir", "tensorboard_dir"):
        if getattr(tr, field):
            check_writable(f"training.{field}", getattr(tr, field))


def quiet_megatron() -> None:
    """Keep the console to our log lines: Hydra sets the root logger to INFO, and Megatron logs every
    parameter of every DDP bucket there; its import warns about optional accelerators (Apex, TE)."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in (
        ".*Apex is not installed.*",
        ".*Transformer Engine.*",
        ".*TransformerEngine.*",
        ".*full scope is deprecated.*",
        # megatron-core 0.19 warns on importing its multimodal configs, which dist_checkpointing pulls in at a save
        ".*MimoModelConfig is experimental.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def launch_experiment(cfg: DictConfig, output_dir: str | os.PathLike, *, scan_tokens: bool = True):
    """Composed config -> validated ExperimentConfig with run paths resolved, and the notices to log."""
    import torch

    experiment = to_experiment(cfg)
    resolve_run_paths(experiment, output_dir)
    notices = validate_for_launch(
        experiment,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        cuda=torch.cuda.is_available(),
        scan_tokens=scan_tokens,
        run_dir=output_dir,
    )
    return experiment, notices


def train_from_config(
    cfg: DictConfig, output_dir: str | os.PathLike, *, scan_tokens: bool = True
) -> dict[str, float]:
    """Validate, then train; returns the last validation metrics (Hydra keeps them per multirun job)."""
    import torch

    quiet_megatron()
    experiment, notices = launch_experiment(cfg, output_dir, scan_tokens=scan_tokens)
    # Megatron is imported only now, after every check that could reject the configuration.
    from mtp_plugin.train import logs

    if experiment.backend.name == "deepspeed":
        from mtp_plugin.train.ds_loop import run
    else:
        from mtp_plugin.train.loop import run

        if not torch.cuda.is_available():
            from mtp_plugin.train.cpu import enable_megatron_on_cpu

            enable_megatron_on_cpu()
    log = logs.RunLog(Path(output_dir) / logs.TRAIN_LOG_NAME)  # what it prints, also in <run dir>/train.log
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:  # the logging rank
        log(f" {experiment.mtp_summary()}")
        for notice in notices:
            log(f" {notice}")
    result = run(experiment, print_fn=log)
    summary = dict(result.valid_history[-1]) if result.valid_history else {}
    if result.train_history and result.start_iteration:
        trained = result.iterations - result.start_iteration
        log(
            f" finished at iteration {result.iterations} ({result.consumed_tokens} tokens in all); this run "
            f"resumed at {result.start_iteration} and trained {trained} iterations "
            f"({result.consumed_tokens - result.start_tokens} tokens) in {result.wall_s:.1f} s"
        )
    elif result.train_history:
        log(
            f" finished {result.iterations} iterations ({result.consumed_tokens} tokens) in {result.wall_s:.1f} s"
        )
    return summary


# Flags after which Hydra prints something and exits without running the task (help, config, info).
_NO_RUN_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
)
# Flags that change which configuration is composed; preflight then leaves validation to the task.
_OTHER_CONFIG_FLAGS = (
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of each job Hydra will run: one, or every combination of a --multirun sweep."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return list(itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None)))


def _composed_jobs(overrides: list[str], multirun: bool, config_dir: Path, *, with_hydra: bool):
    """(job overrides, composed config) for each job, composed with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    register_configs()
    jobs = _jobs(overrides, multirun)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="hydra_app"):
        for job in jobs:
            yield job, compose(config_name=CONFIG_NAME, overrides=job, return_hydra_config=with_hydra)


def compose_experiment(overrides: list[str], config_dir: Path = CONFIG_DIR) -> ExperimentConfig:
    """One job's overrides -> the validated ExperimentConfig, with the app's checks (unknown group
    options and keys, preset conflicts); every rejection is a one-line ConfigError. For tools that size
    or inspect a run without launching it (`python -m mtp_plugin.plan`)."""
    from hydra.errors import HydraException

    check_group_overrides(overrides, config_dir)
    check_override_keys(overrides, config_dir)
    check_experiment_overrides(overrides, config_dir)
    try:
        ((_, cfg),) = _composed_jobs(overrides, False, config_dir, with_hydra=False)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"error: {_one_line(err)}") from None
    return to_experiment(cfg)


def cfg_summary(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """For `--cfg job` / `--cfg all`: the MTP summary line, as a YAML comment printed above Hydra's
    config (`# MTP D = 2 (w_k = 1/D), λ 0.3, then 0.1 from ...`). A configuration that would be
    refused is a ConfigError, as it is for a run. None for other flags or another config path/name
    (and under --multirun, which Hydra refuses with --cfg).
    """
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException

    args = get_args_parser().parse_args(argv)
    if (
        args.cfg not in ("job", "all")
        or args.multirun
        or args.config_path
        or args.config_name
        or args.config_dir
    ):
        return None
    check_group_overrides(args.overrides, config_dir)
    check_override_keys(args.overrides, config_dir)
    check_experiment_overrides(args.overrides, config_dir)
    try:
        ((_, cfg),) = _composed_jobs(args.overrides, False, config_dir, with_hydra=False)
        return f"# {to_experiment(cfg).mtp_summary()}"
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"error: {_one_line(err)}") from None


def preflight(argv: list[str], config_dir: Path = CONFIG_DIR) -> tuple[bool, list[Path]]:
    """Compose and validate every job of `argv` with Hydra's compose API, before `hydra.main` creates
    any run directory, so that a rejected configuration leaves no empty `outputs/<date>/<time>/`.

    Returns (whether every job was composed and validated here, the run directories the jobs will use
    that do not exist yet). Help, --cfg and --info print without running; another config path or name
    is left to the task's own validation.
    """
    from hydra.errors import HydraException
    from omegaconf import open_dict

    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    if any(f in _NO_RUN_FLAGS for f in flags):
        return False, []
    overrides = [a for a in argv if not a.startswith("-")]
    check_group_overrides(overrides, config_dir)
    check_override_keys(overrides, config_dir)
    if any(f in _OTHER_CONFIG_FLAGS for f in flags):
        return False, []
    multirun = "--multirun" in flags or "-m" in flags
    check_experiment_overrides(overrides, config_dir)
    new_dirs = []
    try:
        for num, (_, cfg) in enumerate(_composed_jobs(overrides, multirun, config_dir, with_hydra=True)):
            hydra_cfg = cfg.hydra
            if multirun:
                output_dir = Path(OmegaConf.select(hydra_cfg, "sweep.dir")) / str(num)
            else:
                output_dir = Path(OmegaConf.select(hydra_cfg, "run.dir"))
            with open_dict(cfg):
                del cfg["hydra"]
            launch_experiment(cfg, output_dir.absolute())
            if not output_dir.exists():
                new_dirs.append(output_dir.absolute())
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"error: {_one_line(err)}") from None
    return True, new_dirs


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory this launch created if it holds only Hydra's own files (.hydra/, the
    job log), then its parents up to the working directory while they are empty."""
    if not run_dir.is_dir():
        return
    if any(p.name != ".hydra" and not (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().absolute()
    parent = run_dir.parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


# Under torchrun, how long a rank other than 0 waits for torchrun to stop it after a launch refusal (rank
# 0 reports it); a rank still running after that was refused alone and says why itself.
TORCHRUN_REFUSAL_WAIT_S = 20.0


def report_refusal(err: ConfigError, held: HeldSigterm | None = None) -> None:
    """Print a launch refusal's one line, once per job.

    Under torchrun every rank validates the same configuration and would print the same line, and
    torchrun would add each rank's exit code and signal. Rank 0 prints the line; every rank also writes
    it to torchrun's error file (TORCHELASTIC_ERROR_FILE, the elastic agent's channel for a worker's
    error), so that the last line of torchrun's closing summary is this line, not a pointer to its docs.
    The other ranks wait to be stopped by torchrun after rank 0 has failed, and then exit 2 as well; one
    stopped before it got here (`held`: the SIGTERM it held during its checks) exits 2 at once.
    """

    def write_error_file() -> None:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            Path(error_file).write_text(json.dumps({"message": err.message, "timestamp": int(time.time())}))

    if is_other_torchrun_rank():
        import signal

        def stopped(signum, frame):
            write_error_file()
            raise SystemExit(2)

        signal.signal(signal.SIGTERM, stopped)
        if held is not None and held.arrived:
            stopped(signal.SIGTERM, None)
        time.sleep(TORCHRUN_REFUSAL_WAIT_S)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not stopped: rank 0 was not refused; say it here
    write_error_file()
    print(err.message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, held: HeldSigterm | None = None) -> None:
    """The app. `held`: a SIGTERM held since the process started (`python -m mtp_plugin.train`), released
    once the launch checks pass; without it, one is held from here."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    held = HeldSigterm.on_other_torchrun_ranks() if held is None else held
    argv = sys.argv[1:] if argv is None else argv
    register_configs()
    try:
        summary = cfg_summary(argv)
        if summary:
            print(summary, flush=True)
        validated, new_dirs = preflight(argv)
    except ConfigError as err:
        report_refusal(err, held)
        raise
    held.release()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
    def _app(cfg: DictConfig) -> dict[str, float]:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            # Validated already by preflight; the token scan of every .bin is not repeated.
            return train_from_config(cfg, output_dir, scan_tokens=not validated)
        except ConfigError as err:
            report_refusal(err)
            run_dir, cwd = output_dir.absolute(), Path.cwd().absolute()
            # Without preflight (another --config-name/--config-path) the directory's age is unknown; one
            # holding only what Hydra just wrote is this launch's, unless it is the launch directory.
            if run_dir in new_dirs or (not validated and run_dir != cwd and run_dir not in cwd.parents):
                _remove_if_unused(run_dir)
            raise
        except SystemExit as err:
            # An exit signal during start-up: nothing trained or saved, so a run directory this launch made
            # holds only Hydra's files and the start-up lines (on the console too). The loop module is
            # looked up, not imported: it imports Megatron, and it ran if this is its exception.
            loop = sys.modules.get("mtp_plugin.train.loop")
            stopped = loop is not None and isinstance(err, loop.StoppedBeforeTraining)
            if stopped and output_dir.absolute() in new_dirs:
                _remove_if_unused(output_dir.absolute())
            raise

    sys.argv = [sys.argv[0], *argv]
    _app()
