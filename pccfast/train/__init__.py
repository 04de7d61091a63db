"""Training: one loop for PCC pre-training and fine-tuning, DDP, AMP, exact resume."""

from .batchnorm import recalibrate_batchnorm
from .checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from .config import PCCConfig, TrainConfig
from .distributed import DistEnv, setup, teardown
from .loop import FitResult, evaluate, fit
from .schedule import lr_at

__all__ = ["DistEnv", "FitResult", "PCCConfig", "TrainConfig", "atomic_torch_save", "evaluate",
           "fit", "load_checkpoint", "lr_at", "recalibrate_batchnorm", "save_checkpoint", "setup",
           "teardown"]
