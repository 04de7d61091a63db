"""The OpenMP wait policy, chosen before torch loads its OpenMP runtime (libgomp reads
``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when it is loaded: by ``import torch``).

libgomp's default lets the threads of a finished parallel region spin for a while (300,000
spins) before they sleep. On a machine whose cores are busy with other processes the spinning
threads take the cores from the threads doing work, and every region waits for its slowest
thread: a training step measured up to 3-14x slower (benchmarks/RESULTS.md, "Shared machines").
``PASSIVE`` alone makes them sleep at once, which cost 5-15% of an idle step in wake-ups; with a
short spin first (``GOMP_SPINCOUNT=1000``) the idle step is as fast as libgomp's default and the
loaded one within 5% of ``PASSIVE``'s (RESULTS.md, "Wait policy").

pccfast sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=1000`` when it is imported before
torch and the policy is unset (so the ``pccfast`` command, and the processes it starts, run with
them); values in the environment are always kept. ``pccfast info`` says what is in force.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
SPIN_COUNT = "1000"


def _choose() -> str:
    if "OMP_WAIT_POLICY" in os.environ:
        return "environment"
    if "torch" in sys.modules:
        return "too late"  # libgomp is loaded: its policy is fixed for this process
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return "pccfast"


SOURCE = _choose()


def describe() -> str:
    """The wait policy in force and where it came from, for ``pccfast info``."""
    spin = os.environ.get("GOMP_SPINCOUNT")
    spins = f", GOMP_SPINCOUNT={spin}" if spin is not None else ""
    if SOURCE == "pccfast":
        return (f"{WAIT_POLICY}{spins} (set by pccfast; set OMP_WAIT_POLICY to choose "
                "another)")
    if SOURCE == "environment":
        return f"{os.environ.get('OMP_WAIT_POLICY')}{spins} (from the environment)"
    return ("libgomp's default (threads spin after each region): torch was imported before "
            "pccfast; set OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=1000 on a shared machine")
