"""What each stage's outputs were made from, so that a run folder never reuses stale files.

A stage's *settings* are the config values its outputs depend on: the data and model settings,
run.seed, its own section(s), and those of the stages it reads from (scores reads the
pretrained model, prune the scores, finetune the pruned model), plus the SHA-256 of
model.init's file and a stamp of every data file (``data.file:NAME``: pccfast.data.stamps).
Each finished stage records them, and their hash (the *fingerprint*), in DIR/stages.json; its
training checkpoint carries them too. Settings that change speed, not results, are left out.

The rules (README, "Run folders"):
- a stage reads an earlier stage's output only if that output's recorded settings equal the
  current ones (else it refuses, naming the settings that differ);
- ``--resume`` reuses finished stages and checkpoints only if their settings equal the current
  ones (else it refuses: a changed setting means a new run);
- a stage that runs removes its old outputs and those of every stage that reads from it.
"""

from __future__ import annotations

import hashlib
import json

STAGES = ("baseline", "pretrain", "scores", "prune", "finetune")
# stage -> the stage whose output it reads
READS = {"scores": "pretrain", "prune": "scores", "finetune": "prune"}
# stage -> the config sections that are its own
OWN_SECTIONS = {"baseline": ("pretrain",), "pretrain": ("pretrain", "pcc"), "scores": ("ci",),
                "prune": ("prune",), "finetune": ("finetune",)}
COMMON_SECTIONS = ("data", "model", "run")
# speed, placement or bookkeeping only: a resume may change them
IGNORED = frozenset({"data.workers", "data.download", "run.device", "run.baseline",
                     "pcc.backend", "pretrain.compile", "finetune.compile", "prune.speed"})
# the command that (re)makes each stage's outputs
COMMAND = {"baseline": "train", "pretrain": "train", "scores": "scores", "prune": "prune",
           "finetune": "finetune"}
INIT_DIGEST = "model.init_sha256"


def chain(stage: str) -> list[str]:
    """``stage`` and the stages it reads from, upstream first."""
    out = [stage]
    while out[0] in READS:
        out.insert(0, READS[out[0]])
    return out


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that reads (directly or not) from it, in order."""
    return [s for s in STAGES if stage in chain(s)]


def _plain(value):
    """1.0 and 1 hash alike (a TOML ``1`` and a flag's ``1.0`` are the same setting)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def stage_settings(tree: dict, stage: str, init_digest: str | None = None,
                   data_stamps: dict | None = None) -> dict:
    """The flat ``{"section.key": value}`` settings ``stage``'s outputs depend on.

    tree: RunConfig.to_dict(); init_digest: SHA-256 of model.init's file (None: no file);
    data_stamps: pccfast.data.stamps.data_stamps of data.spec (every stage reads the data)."""
    sections = list(COMMON_SECTIONS)
    for s in chain(stage):
        sections += [x for x in OWN_SECTIONS[s] if x not in sections]
    flat = {}
    for section in sections:
        for key, value in tree[section].items():
            name = f"{section}.{key}"
            if name not in IGNORED:
                flat[name] = _plain(value)
    if init_digest is not None:
        flat[INIT_DIGEST] = init_digest
    flat.update(data_stamps or {})
    return flat


def fingerprint(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(recorded: dict, current: dict) -> list[str]:
    """``["pretrain.epochs=2 (now 6)", ...]``; empty when the settings agree.

    A model.init digest the current settings lack (the file is gone since) is not a difference:
    only pre-training reads that file. Nor are data stamps a record lacks altogether (made by a
    pccfast without them)."""
    from ..data.stamps import is_stamp

    unstamped = not any(is_stamp(k) for k in recorded)
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key == INIT_DIGEST and key not in current:
            continue
        if unstamped and is_stamp(key):
            continue
        was, now = recorded.get(key, _UNSET), current.get(key, _UNSET)
        if was != now:
            out.append(f"{key}={_show(was)} (now {_show(now)})")
    return out


_UNSET = object()


def _show(value) -> str:
    if value is _UNSET:
        return "unset"
    return json.dumps(value) if isinstance(value, str) or value is None else str(value)


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
