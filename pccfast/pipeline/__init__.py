"""The PCC + CI pipeline: pretrain (with PCC) -> scores -> prune -> finetune, in one run folder."""

from .config import RunConfig, demo_config, load_toml
from .folder import RunFolder
from .stages import Pipeline, StageError, build_model

__all__ = ["Pipeline", "RunConfig", "RunFolder", "StageError", "build_model", "demo_config",
           "load_toml"]
