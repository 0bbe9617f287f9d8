"""Typed configuration: the dataclass tree (`schema`), its YAML/override loader (`load`) and the checks run on
every loaded config (`checks`)."""
from optrush.config.errors import ConfigError
from optrush.config.load import load_config, to_dict, to_yaml
from optrush.config.schema import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                                   ParallelConfig, PeftConfig, PrecisionConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "load_config", "to_dict", "to_yaml", "ModelConfig", "DataConfig", "TrainConfig",
           "OptimConfig", "PrecisionConfig", "PeftConfig", "ParallelConfig", "CheckpointConfig", "LoggingConfig"]
