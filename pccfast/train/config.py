"""The settings of one training stage (pre-training or fine-tuning), checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class PCCConfig:
    """The PCC regulariser of pre-training (SPEC section 1); ``weight = 0`` turns it off."""

    weight: float = 0.05
    mode: str = "promote"
    orientation: str = "channel"
    group: str = "sample"
    penalty: str = "abs"
    backend: str = "auto"

    def __post_init__(self):
        _check_number("pcc.weight", self.weight, minimum=0.0)
        from ..ops.backends import BACKENDS
        from ..regularizer import MODES

        if self.mode not in MODES:
            raise ValueError(f"pcc.mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if self.backend not in BACKENDS:  # (availability on the device: Pipeline.check)
            raise ValueError(f"pcc.backend must be one of {BACKENDS}, got {self.backend!r}")
        self._options()  # orientation, group and penalty checked together

    @property
    def options(self):
        """The score's options as one :class:`~pccfast.ops.pcc_options.PCCOptions` value, the
        form the regulariser takes."""
        return self._options()

    def _options(self):
        from ..ops.pcc_options import PCCOptions

        try:
            return PCCOptions(self.orientation, self.group, self.penalty)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pcc.{exc}") from exc

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class TrainConfig:
    """SGD with momentum, linear warm-up then cosine decay, per step.

    batch_size is the global batch (split over DDP processes). With ``lr_reference_batch`` set,
    the learning rate is scaled linearly: ``lr * batch_size / lr_reference_batch`` (Goyal et
    al.'s rule for large batches). amp: "none", "bf16" (autocast, no scaler) or "fp16"
    (autocast with a gradient scaler).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    grad_clip: float | None = None
    eval_every: int = 1
    seed: int = 0

    def __post_init__(self):
        check_int("epochs", self.epochs, 0, type_error=True)
        check_int("batch_size", self.batch_size, 1, type_error=True)
        _check_number("lr", self.lr, minimum=0.0)
        if self.lr_reference_batch is not None:
            check_int("lr_reference_batch", self.lr_reference_batch, 1, type_error=True)
        _check_number("momentum", self.momentum, minimum=0.0)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        _check_number("warmup_epochs", self.warmup_epochs, minimum=0.0)
        _check_number("min_lr", self.min_lr, minimum=0.0)
        _check_number("label_smoothing", self.label_smoothing, minimum=0.0)
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, minimum=0.0)
        check_int("eval_every", self.eval_every, 1, type_error=True)
        check_int("seed", self.seed, 0, type_error=True)

    @property
    def scaled_lr(self) -> float:
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_reference_batch


def _check_number(name: str, value, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= minimum or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
