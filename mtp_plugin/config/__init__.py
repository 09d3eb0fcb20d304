"""Typed configuration dataclasses (the schema); Hydra YAML under hydra_configs/ only fills them."""

from mtp_plugin.config.cluster import ClusterConfig
from mtp_plugin.config.model import ModelConfig
from mtp_plugin.config.mtp import LambdaScheduleConfig, MTPConfig
from mtp_plugin.config.parallel import ParallelConfig
from mtp_plugin.config.training import BackendConfig, DataConfig, ExperimentConfig, TrainingConfig

__all__ = [
    "BackendConfig",
    "ClusterConfig",
    "DataConfig",
    "ExperimentConfig",
    "LambdaScheduleConfig",
    "MTPConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
]
