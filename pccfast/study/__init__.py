"""Accuracy studies: does PCC pre-training make pruning better, and by which criterion?

    pccfast study --config benchmarks/accuracy/study_cpu.toml --out benchmarks/accuracy

See :mod:`pccfast.study.config` for the file, :mod:`pccfast.study.runner` for the folder and
how it resumes, :mod:`pccfast.study.report` for the tables and plots.
"""

from ..prune.criteria import CRITERIA
from .config import Arm, StudyConfig
from .runner import Study, StudyError

__all__ = ["CRITERIA", "Arm", "Study", "StudyConfig", "StudyError"]
