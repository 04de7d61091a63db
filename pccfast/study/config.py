"""What a study compares: pre-training arms x seeds x criteria x FLOPs targets.

A study file is a run config (the sections of :mod:`pccfast.pipeline.config`: data, model,
pretrain, pcc, ci, prune.bn_images, finetune, run) plus two tables:

    [study]
    seeds = [0, 1]
    criteria = ["ci", "l1", "random"]
    targets = [0.3, 0.5, 0.7, 0.846, 0.9]      # FLOPs removed: the post-pruning curve
    finetune_targets = [0.5, 0.846]             # the subset also fine-tuned (expensive)

    allocation = ["fixed"]                      # or "adaptive", or both (reported apart)
    profile = "[0.51]*7+[0.90]*5"               # the fixed allocation's rate profile
    primary_target = 0.846                      # the primary endpoint's target (default: the
                                                # largest fine-tuned one)
    feature_images = 256                        # images for the feature record (0: none)

    [arms.no_pcc.pcc]                           # one table per pre-training arm: overrides of
    weight = 0.0                                # the run config (any section)
    [arms.pcc]

Every arm x seed is pre-trained once; every allocation x criterion x target prunes from that
model. Allocation ``fixed`` gives every criterion and arm of an arm x seed x target the same
per-layer keep counts: the profile scaled by one number, found on the graph alone, to meet the
target (so a comparison of criteria or arms is one of *which* channels, not *how many*);
``adaptive`` searches the budget on each criterion's own scores (tau). The first arm is the
baseline every other arm is compared with, seed by seed; the primary endpoint is the second arm
minus the first, of the first criterion under the first allocation, after fine-tuning at
``primary_target``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

from .._checks import check_int
from ..pipeline.config import RunConfig
from ..pipeline.records import fingerprint
from ..prune.criteria import get_criterion

ALLOCATIONS = ("fixed", "adaptive")
MAX_SEED = 2**63 - 1  # torch's generators take int64 seeds
DECIMALS = 6  # targets are recorded with 6 decimals: a target must be exact at that precision
# settings of a run config that [study] sets per cell: an arm that overrides them is overridden
STUDY_SET = {"run": ("seed",), "pretrain": ("seed",), "finetune": ("seed",), "ci": ("criterion",),
             "prune": ("target_flops", "target_params", "rates", "tau")}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Arm:
    name: str
    config: RunConfig  # the resolved run settings of this arm (the seed is set per cell)
    overrides: dict = field(default_factory=dict)


@dataclass
class StudyConfig:
    base: dict
    arms: list[Arm]
    seeds: list[int]
    criteria: list[str]
    targets: list[float]
    finetune_targets: list[float]
    allocations: list[str] = field(default_factory=lambda: ["adaptive"])
    profile: str | None = None
    primary_target: float | None = None
    feature_images: int = 0

    @classmethod
    def from_dict(cls, tree: dict) -> "StudyConfig":
        if not isinstance(tree, dict):
            raise TypeError(f"a study config must be a table, got {type(tree).__name__}")
        tree = dict(tree)
        study = tree.pop("study", None)
        arms = tree.pop("arms", None)
        if not isinstance(study, dict):
            raise ValueError("a study config needs a [study] table (seeds, criteria, targets, "
                             "finetune_targets)")
        if not isinstance(arms, dict) or not arms:
            raise ValueError("a study config needs at least one arm: [arms.NAME] tables")
        known = {"seeds", "criteria", "targets", "finetune_targets", "allocation", "profile",
                 "primary_target", "feature_images"}
        unknown = sorted(set(study) - known)
        if unknown:
            raise ValueError(f"[study] has no key(s) {unknown} (known: {sorted(known)})")
        seeds = _int_list("study.seeds", study.get("seeds", [0]))
        criteria = _criteria(study.get("criteria", ["ci"]))
        targets = _fractions("study.targets", study.get("targets"))
        finetune = _fractions("study.finetune_targets", study.get("finetune_targets", []),
                              allow_empty=True)
        missing = [t for t in finetune if t not in targets]
        if missing:
            raise ValueError(f"study.finetune_targets {missing} are not in study.targets {targets}")
        profile = study.get("profile")
        allocations = _allocations(study.get("allocation", ["fixed"] if profile else ["adaptive"]))
        if profile is not None and not isinstance(profile, str):
            raise TypeError(f"study.profile must be a rate list such as '[0.51]*7+[0.90]*5', got "
                            f"{type(profile).__name__}")
        if "fixed" in allocations and not profile:
            raise ValueError("study.allocation 'fixed' needs study.profile, the rate profile "
                             "scaled to each target (e.g. '[0.51]*7+[0.90]*5' for VGG-16)")
        primary = study.get("primary_target", max(finetune or targets))
        if primary not in targets:
            raise ValueError(f"study.primary_target {primary!r} is not in study.targets {targets}")
        feature_images = study.get("feature_images", 0)
        check_int("study.feature_images", feature_images, 0)
        base = RunConfig.from_dict(tree)  # checks the base sections and keys
        built = []
        for name, overrides in arms.items():
            if not _NAME.match(name):
                raise ValueError(f"arm name {name!r}: use letters, digits, '_', '.', '-'")
            if not isinstance(overrides, dict):
                raise TypeError(f"[arms.{name}] must be a table of run-config sections")
            try:
                config = RunConfig.from_dict(overrides, base=base)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"[arms.{name}]: {exc}") from exc
            if config.prune.bn_images <= 0:
                where = "" if base.prune.bn_images <= 0 else f"[arms.{name}] sets "
                raise ValueError(f"{where}prune.bn_images must be positive: a study measures "
                                 "accuracy after pruning with BatchNorm statistics re-estimated "
                                 "(e.g. [prune] bn_images = 1024)")
            _warn_overridden(name, overrides)
            built.append(Arm(name, config, overrides))
        return cls(base=tree, arms=built, seeds=seeds, criteria=criteria, targets=targets,
                   finetune_targets=finetune, allocations=allocations, profile=profile,
                   primary_target=float(primary), feature_images=feature_images)

    def to_dict(self) -> dict:
        study = {"seeds": self.seeds, "criteria": self.criteria, "targets": self.targets,
                 "finetune_targets": self.finetune_targets, "allocation": self.allocations,
                 "primary_target": self.primary_target, "feature_images": self.feature_images}
        if self.profile is not None:
            study["profile"] = self.profile
        return {**self.base, "study": study,
                "arms": {a.name: a.overrides for a in self.arms}}

    def arm_config(self, arm: Arm, seed: int) -> RunConfig:
        """The arm's settings with this seed (data subset, initial weights, training order)."""
        return RunConfig.from_dict({"run": {"seed": seed}, "pretrain": {"seed": seed},
                                    "finetune": {"seed": seed}}, base=arm.config)

    def budget(self, allocation: str, target: float) -> dict:
        """The keyword arguments of :func:`pccfast.prune` for one cell."""
        if allocation == "fixed":
            return {"rates": self.profile, "target_flops": target}
        return {"target_flops": target}


def settings_hash(obj) -> str:
    """The one settings hash (the run folders' :func:`pccfast.pipeline.records.fingerprint`)."""
    return fingerprint(obj)


def _warn_overridden(name: str, overrides: dict) -> None:
    for section, keys in STUDY_SET.items():
        table = overrides.get(section)
        for key in keys:
            if isinstance(table, dict) and key in table:
                warnings.warn(f"[arms.{name}] sets {section}.{key}, which the study sets per cell "
                              "from [study] (seeds, criteria, targets): the arm's value is not "
                              "used", stacklevel=3)


def non_default(tree: dict) -> dict:
    """The settings of a run-config tree that differ from the defaults. Hashing these, not the
    whole tree, keeps a study's committed rows valid when a later pccfast adds a setting."""
    defaults = RunConfig().to_dict()
    return {section: changed for section, values in tree.items()
            if (changed := {k: v for k, v in values.items()
                            if defaults.get(section, {}).get(k, object()) != v})}


def _int_list(name: str, value) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of integers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name} must hold integers from 0 to 2**63 - 1, got {v!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} has repeated entries: {value}")
    return list(value)


def _criteria(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"study.criteria must be a non-empty list, got {value!r}")
    for v in value:
        try:
            get_criterion(v, "a criterion")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"study.criteria: unknown criterion {v!r}: {exc}") from exc
    if len(set(value)) != len(value):
        raise ValueError(f"study.criteria has repeated entries: {value}")
    return list(value)


def _allocations(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or any(v not in ALLOCATIONS for v in value):
        raise ValueError(f"study.allocation must be one or both of {list(ALLOCATIONS)}, got "
                         f"{value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"study.allocation has repeated entries: {value}")
    return list(value)


def _fractions(name: str, value, allow_empty: bool = False) -> list[float]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of "
                         f"fractions in (0, 1), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0 < v < 1:
            raise ValueError(f"{name} must hold fractions in (0, 1), got {v!r}")
        if round(v, DECIMALS) != v:
            raise ValueError(f"{name}: {v!r} has more than {DECIMALS} decimals, the precision "
                             f"study.csv records targets with (write {round(v, DECIMALS)})")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {out}")
    return sorted(out)
