"""Typed configuration: schema (dataclasses), YAML + dotlist loading, validation."""

from .load import ConfigError, check_teacher_data, config_to_dict, dump_config, load_config
from .schema import Config

__all__ = ["Config", "ConfigError", "check_teacher_data", "config_to_dict", "dump_config", "load_config"]
