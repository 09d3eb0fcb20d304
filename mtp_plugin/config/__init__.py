"""Typed configuration dataclasses (the schema); Hydra YAML under hydra_configs/ only fills them."""

from mtp_plugin.config.model import ModelConfig
from mtp_plugin.config.mtp import LambdaScheduleConfig, MTPConfig

__all__ = ["LambdaScheduleConfig", "MTPConfig", "ModelConfig"]
