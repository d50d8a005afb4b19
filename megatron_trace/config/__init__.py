"""Typed configuration: schema (dataclasses), YAML + dotlist loading, validation."""

from .load import ConfigError, dump_config, load_config
from .schema import Config

__all__ = ["Config", "ConfigError", "dump_config", "load_config"]
