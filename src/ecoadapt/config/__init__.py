"""The run configuration: typed dataclasses whose field docstrings are the help text.

``schema`` turns dataclasses into checked schemas; ``run`` holds the run's sections and their
loading (YAML plus ``--set`` overrides); ``data``, ``measure``, ``task`` and ``report`` hold the
sections of those names. This package's names are the config's public face: ``from ecoadapt.config import
RunConfig, load``. No torch.
"""

from ecoadapt.config.data import MLM_PROBABILITY, DataConfig
from ecoadapt.config.measure import BudgetConfig, MeasureConfig
from ecoadapt.config.overrides import apply_overrides, parse_override
from ecoadapt.config.run import (
    WORLD_GRID_G_CO2_PER_KWH,
    WORLD_GRID_SOURCE,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    all_keys,
    check,
    dump,
    from_dict,
    load,
)
from ecoadapt.config.task import TaskConfig

__all__ = [
    "MLM_PROBABILITY",
    "WORLD_GRID_G_CO2_PER_KWH",
    "WORLD_GRID_SOURCE",
    "BudgetConfig",
    "DataConfig",
    "LoraConfig",
    "MeasureConfig",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "all_keys",
    "apply_overrides",
    "check",
    "dump",
    "from_dict",
    "load",
    "parse_override",
]
