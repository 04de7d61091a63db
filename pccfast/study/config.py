"""What a study compares: pre-training arms x seeds x criteria x FLOPs targets.

A study file is a run config (the sections of :mod:`pccfast.pipeline.config`: data, model,
pretrain, pcc, ci, prune.bn_images, finetune, run) plus two tables:

    [study]
    seeds = [0, 1]
    criteria = ["ci", "l1", "random"]
    targets = [0.3, 0.5, 0.7, 0.846, 0.9]      # FLOPs removed: the post-pruning curve
    finetune_targets = [0.5, 0.846]             # the subset also fine-tuned (expensive)

    [arms.no_pcc.pcc]                           # one table per pre-training arm: overrides of
    weight = 0.0                                # the run config (any section)
    [arms.pcc]

Every arm x seed is pre-trained once; every criterion x target prunes from that model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from ..pipeline.config import RunConfig
from ..prune.criteria import CRITERIA, get_criterion  # noqa: F401 (CRITERIA: pccfast.study's)
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
        known = {"seeds", "criteria", "targets", "finetune_targets"}
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
        base = RunConfig.from_dict(tree)  # checks the base sections and keys
        if base.prune.bn_images <= 0:
            raise ValueError("a study measures accuracy after pruning with BatchNorm statistics "
                             "re-estimated: set [prune] bn_images (e.g. 1024)")
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
            built.append(Arm(name, config, overrides))
        return cls(base=tree, arms=built, seeds=seeds, criteria=criteria, targets=targets,
                   finetune_targets=finetune)

    def to_dict(self) -> dict:
        return {**self.base, "study": {"seeds": self.seeds, "criteria": self.criteria,
                                       "targets": self.targets,
                                       "finetune_targets": self.finetune_targets},
                "arms": {a.name: a.overrides for a in self.arms}}

    def arm_config(self, arm: Arm, seed: int) -> RunConfig:
        """The arm's settings with this seed (data subset, initial weights, training order)."""
        return RunConfig.from_dict({"run": {"seed": seed}, "pretrain": {"seed": seed},
                                    "finetune": {"seed": seed}}, base=arm.config)


def settings_hash(obj) -> str:
    """A short stable hash of JSON-able settings: ties a folder's files to what made them."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must hold non-negative integers, got {v!r}")
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


def _fractions(name: str, value, allow_empty: bool = False) -> list[float]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of "
                         f"fractions in (0, 1), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0 < v < 1:
            raise ValueError(f"{name} must hold fractions in (0, 1), got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {out}")
    return sorted(out)
