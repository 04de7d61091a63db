"""Tiny digits studies for the study tests: one way to build a config from a base tree and to
run it quietly."""

from __future__ import annotations

from pccfast.study import Study, StudyConfig


def study_config(base: dict, **sections) -> StudyConfig:
    """`base` with some sections changed: a dict is merged into that section, except `arms`,
    which is replaced whole (an arm left out is meant to be gone)."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in sections.items():
        tree[section] = values if section == "arms" else {**tree.get(section, {}), **values}
    return StudyConfig.from_dict(tree)


def run(config: StudyConfig, out, **kw):
    return Study(config, out, progress=False, echo=None, **kw).run()
