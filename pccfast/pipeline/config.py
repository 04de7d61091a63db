"""The settings of a whole run: defaults < the run folder's config.json < a TOML file < flags.

A config is data (TOML sections mirroring the dataclasses below); unknown keys are errors that
name the section and the keys it knows.

    [data]      spec, train_limit, test_limit, val_images, download, augment, pad, crop,
                workers
    [model]     name (a zoo name or "package.module:factory"), width, init
    [pretrain]  TrainConfig fields (epochs, batch_size, lr, warmup_epochs, amp, ...)
    [pcc]       weight, mode, orientation, group, penalty, backend
    [ci]        criterion (a name in pccfast.prune.CRITERIA or "package.module:Class"), images,
                batch_size
    [prune]     one of rates, tau, target_flops, target_params; bn_images, round_to, speed
    [finetune]  TrainConfig fields
    [run]       baseline, device, seed
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .._checks import check_int
from ..atomic import atomic_write_json
from ..prune.criteria import get_criterion
from ..train.config import PCCConfig, TrainConfig

PRUNE_KEYS = ("rates", "tau", "target_flops", "target_params")


@dataclass
class DataSection:
    spec: str = "digits"
    train_limit: int | None = None
    test_limit: int | None = None
    download: bool = False
    augment: str = "auto"
    pad: int | None = None
    crop: int = 224
    workers: int = 4
    val_images: int = 0  # training images held out for choices (the test set: final numbers)

    def __post_init__(self):
        from ..data import AUGMENTS, parse_spec

        parse_spec(self.spec)
        check_int("data.train_limit", self.train_limit, 1, optional=True)
        check_int("data.test_limit", self.test_limit, 1, optional=True)
        check_int("data.val_images", self.val_images, 0)
        _check_bool("data.download", self.download)
        if self.augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {self.augment!r}")
        check_int("data.pad", self.pad, 0, optional=True)
        check_int("data.crop", self.crop, 1)
        check_int("data.workers", self.workers, 0)


@dataclass
class ModelSection:
    name: str = "vgg16_cifar"
    width: float | None = None
    init: str = ""  # a state-dict file loaded before pre-training (e.g. torchvision's weights)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model.name must be a zoo name or 'package.module:factory', "
                             f"got {self.name!r}")
        w = self.width
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))
                              or not 0 < w < float("inf")):
            raise ValueError(f"model.width must be a positive number, got {w!r}")
        if not isinstance(self.init, str):
            raise ValueError(f"model.init must be a file name (a string), got {self.init!r}")


@dataclass
class CISection:
    images: int = 640
    batch_size: int = 128
    # what the scores stage ranks channels by: a name of pccfast.prune.CRITERIA or
    # "package.module:Class" (a pccfast.prune.Criterion subclass)
    criterion: str = "ci"

    def __post_init__(self):
        for name in ("images", "batch_size"):
            check_int(f"ci.{name}", getattr(self, name), 1)
        if not isinstance(self.criterion, str):
            raise ValueError(f"ci.criterion must be a criterion's name, got {self.criterion!r}")
        get_criterion(self.criterion, "ci.criterion")


@dataclass
class PruneSection:
    rates: str | None = None
    tau: float | None = None
    target_flops: float | None = None
    target_params: float | None = None
    # > 0: also report pruned_bn_acc, the pruned model's accuracy with its BatchNorm statistics
    # re-estimated on this many training images (the saved model and fine-tuning are unchanged)
    bn_images: int = 0
    round_to: int = 1  # every pruned group keeps a multiple of this many channels
    # measure the pruned model's CPU speed-up over the original (a second or two at batch 1)
    speed: bool = True

    def __post_init__(self):
        from ..prune.plan import check_round_to

        try:
            check_round_to(self.round_to)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"prune.{exc}") from None
        _check_bool("prune.speed", self.speed)
        check_int("prune.bn_images", self.bn_images, 0)
        given = [k for k in PRUNE_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"prune takes one of {PRUNE_KEYS}, got {', '.join(given)}")
        for k in ("tau", "target_flops", "target_params"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and 0 < v < 1):
                raise ValueError(f"prune.{k} must be a fraction in (0, 1), got {v!r}")
        if self.rates is not None:
            _check_rates_syntax(self.rates)

    @property
    def budget(self) -> dict:
        """How much to prune: the one keyword for pccfast.prune (rates=, tau=, target_flops= or
        target_params=); empty when none is set. (Which channels: ci.criterion.)"""
        return {k: getattr(self, k) for k in PRUNE_KEYS if getattr(self, k) is not None}


@dataclass
class RunSection:
    baseline: bool = False
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        _check_bool("run.baseline", self.baseline)
        _check_device(self.device)
        check_int("run.seed", self.seed, 0)


@dataclass
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    pcc: PCCConfig = field(default_factory=PCCConfig)
    ci: CISection = field(default_factory=CISection)
    prune: PruneSection = field(default_factory=lambda: PruneSection(target_flops=0.5))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.01))
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tree: dict, base: "RunConfig | None" = None) -> "RunConfig":
        """``base`` (default: the defaults) updated by the sections and keys of ``tree``."""
        current = (base or cls()).to_dict()
        if not isinstance(tree, dict):
            raise TypeError(f"a config must be a table of sections, got {type(tree).__name__}")
        for section, values in tree.items():
            if section not in current:
                raise ValueError(f"config has no section [{section}] (known: {', '.join(current)})")
            if not isinstance(values, dict):
                raise TypeError(f"config [{section}] must be a table, got {values!r}")
            if section == "prune":
                given = [k for k in PRUNE_KEYS if values.get(k) is not None]
                if len(given) > 1:
                    raise ValueError(f"config [prune] sets {' and '.join(given)}: give one of "
                                     f"{', '.join(PRUNE_KEYS)}")
            for key, value in values.items():
                if key not in current[section]:
                    raise ValueError(
                        f"config [{section}] has no key {key!r} "
                        f"(known: {', '.join(current[section])})"
                    )
                if section == "prune" and key in PRUNE_KEYS and value is not None:
                    for other in PRUNE_KEYS:  # one budget: setting one clears the others
                        current[section][other] = None
                current[section][key] = value
        return cls._build(current)

    @classmethod
    def _build(cls, tree: dict) -> "RunConfig":
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        sections = {}
        for name, factory in kinds.items():
            kind = type(factory())
            try:
                sections[name] = kind(**tree[name])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"config [{name}]: {exc}") from exc
        return cls(**sections)


def load_toml(path: str | Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise ImportError("reading TOML configs on Python 3.10 needs tomli "
                              "(pip install tomli)") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib reads UTF-8 text only
        raise ValueError(f"config file {path} is not a TOML text file (not UTF-8: byte "
                         f"{exc.object[exc.start]:#04x} at offset {exc.start})") from exc
    except OSError as exc:
        raise ValueError(f"config file {path} cannot be read ({exc.strerror or exc})") from exc


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_device(device) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (what the training loop runs on), before torch's own
    RuntimeError could surface after the data has loaded."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_rates_syntax(rates) -> None:
    """A rate list that parses, with every rate in [0, 1); its length is checked against the
    model before the first stage (Pipeline.check)."""
    from ..prune.plan import parse_rates

    if isinstance(rates, str):
        values = parse_rates(rates)
    elif isinstance(rates, list):
        values = rates
    elif isinstance(rates, (int, float)) and not isinstance(rates, bool):
        values = [rates]
    else:
        raise ValueError(f"prune.rates must be a rate list such as '[0.21]*7+[0.75]*5', "
                         f"got {rates!r}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"prune.rates[{i}] must be a rate in [0, 1), got {v!r}")


def parse_assignment(text: str) -> dict:
    """``"pretrain.lr=0.05"`` -> {"pretrain": {"lr": 0.05}}; the value is read as TOML, else a
    string."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ValueError(f"--set takes SECTION.KEY=VALUE (e.g. pretrain.lr=0.05), got {text!r}")
    try:
        import tomllib

        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except Exception:
        value = raw.strip()
    return {section: {name: value}}


def save_json(path: Path, obj) -> None:
    """Writes JSON atomically (temporary file + rename)."""
    atomic_write_json(path, obj)


def demo_config() -> RunConfig:
    """``pccfast demo``: a small VGG on the bundled digits, pruned to half the FLOPs."""
    return RunConfig.from_dict({
        "data": {"spec": "digits", "workers": 0},
        "model": {"name": "vgg16_cifar", "width": 0.25},
        "pretrain": {"epochs": 8, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1,
                     "weight_decay": 5e-4},
        "pcc": {"weight": 0.05},
        "ci": {"images": 512, "batch_size": 128},
        "prune": {"target_flops": 0.5, "bn_images": 512},
        "finetune": {"epochs": 4, "batch_size": 64, "lr": 0.01, "weight_decay": 5e-4},
        "run": {"baseline": True, "device": "cpu"},
    })
