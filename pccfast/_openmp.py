"""The OpenMP wait policy, chosen before torch loads its OpenMP runtime (libgomp reads
``OMP_WAIT_POLICY`` once, when it is loaded: by ``import torch``).

libgomp's default lets the threads of a finished parallel region spin for a while before they
sleep. On a machine whose cores are busy with other processes the spinning threads take the
cores from the threads doing work, and every region waits for its slowest thread: a training
step measured 3-14x slower (benchmarks/RESULTS.md, "Shared machines"). ``PASSIVE`` makes them
sleep at once, which costs a wake-up per region and nothing measurable on an idle machine.

pccfast sets ``OMP_WAIT_POLICY=PASSIVE`` when it is imported before torch and the variable is
unset (so the ``pccfast`` command, and the processes it starts, run with it); a value in the
environment is always kept. ``pccfast info`` says which policy is in force.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"


def _choose() -> str:
    if "OMP_WAIT_POLICY" in os.environ:
        return "environment"
    if "torch" in sys.modules:
        return "too late"  # libgomp is loaded: its policy is fixed for this process
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return "pccfast"


SOURCE = _choose()


def describe() -> str:
    """The wait policy in force and where it came from, for ``pccfast info``."""
    if SOURCE == "pccfast":
        return f"{WAIT_POLICY} (set by pccfast; set OMP_WAIT_POLICY to choose another)"
    if SOURCE == "environment":
        return f"{os.environ.get('OMP_WAIT_POLICY')} (from the environment)"
    return ("libgomp's default (threads spin after each region): torch was imported before "
            "pccfast; set OMP_WAIT_POLICY=PASSIVE on a shared machine")
