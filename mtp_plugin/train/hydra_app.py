"""The Hydra layer of `python -m mtp_plugin.train`: schema registration, composition, validation.

Only the entry point imports Hydra. The schema is the plugin's dataclasses (`ExperimentConfig` and the
group dataclasses it holds), registered in Hydra's ConfigStore; the YAML under `hydra_configs/` fills
them. Every check that can fail — an unknown group option, a field out of range, groups that do not
fit each other or the number of processes, a missing dataset — ends the program with one line naming
the field and the fix, before torch.distributed, Megatron's parallel state or any model exists.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtp_plugin.config import ExperimentConfig

# Shipped inside the package (wheels too); the top-level hydra_configs/ of a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "hydra_configs"
CONFIG_NAME = "config"
SCHEMA_NAME = "experiment_schema"


class ConfigError(SystemExit):
    """A user-fixable configuration problem: exits with status 2 and this one line."""

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


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Build the dataclasses from a composed config; a validation error becomes a ConfigError."""
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


def validate_for_launch(experiment: ExperimentConfig, *, world_size: int, cuda: bool) -> None:
    """The checks that need the launch: process count, files on disk, device, the adapter's plan."""
    try:
        experiment.check_world_size(world_size)
        if not cuda and experiment.training.clip_grad > 0:
            raise ValueError(
                f"training.clip_grad={experiment.training.clip_grad}: Megatron's gradient clipping needs CUDA "
                "tensors; set training.clip_grad=0 on CPU (the grad norm is still logged)"
            )
        if not cuda:
            from mtp_plugin.train.cpu import check_cpu_run

            check_cpu_run(experiment.model)
        if not cuda and experiment.backend.params_dtype != "float32":
            raise ValueError(
                "backend.params_dtype=bfloat16 needs a GPU; use backend.params_dtype=float32 on CPU"
            )
        from mtp_plugin.megatron import check_supported

        check_supported(experiment.model, experiment.parallel, experiment.mtp)
        # Files last: every configuration error is reported even before the corpus has been prepared.
        experiment.data.check_files()
        from mtp_plugin.train.data import check_token_range

        check_token_range(experiment.data, experiment.model)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"error: {err}") from None


def quiet_megatron() -> None:
    """Keep the console to our log lines: Hydra sets the root logger to INFO, and Megatron logs every
    parameter of every DDP bucket there; its import warns about optional accelerators (Apex, TE)."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in (
        ".*Apex is not installed.*",
        ".*Transformer Engine.*",
        ".*TransformerEngine.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def train_from_config(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, float]:
    """Validate, then train; returns the last validation metrics (Hydra keeps them per multirun job)."""
    import torch

    quiet_megatron()
    experiment = to_experiment(cfg)
    resolve_run_paths(experiment, output_dir)
    validate_for_launch(
        experiment, world_size=int(os.environ.get("WORLD_SIZE", "1")), cuda=torch.cuda.is_available()
    )
    # Megatron is imported only now, after every check that could reject the configuration.
    from mtp_plugin.train import logs
    from mtp_plugin.train.loop import run

    if not torch.cuda.is_available():
        from mtp_plugin.train.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    log = logs.RunLog(Path(output_dir) / logs.TRAIN_LOG_NAME)  # what it prints, also in <run dir>/train.log
    result = run(experiment, print_fn=log)
    summary = dict(result.valid_history[-1]) if result.valid_history else {}
    if result.train_history:
        log(
            f" finished {result.iterations} iterations ({result.consumed_tokens} tokens) in {result.wall_s:.1f} s"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_group_overrides(argv)
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        raise
    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
    def _app(cfg: DictConfig) -> dict[str, float]:
        try:
            return train_from_config(cfg, HydraConfig.get().runtime.output_dir)
        except ConfigError as err:
            print(err.message, file=sys.stderr)
            raise

    sys.argv = [sys.argv[0], *argv]
    _app()
