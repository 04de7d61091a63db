import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning threads
# starve each other (a ResNet-56 forward went from 0.03 s to 7.7 s). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # after a short spin (pccfast/_openmp.py)

# tests/ on the path so test modules can share tests/cases.py.
sys.path.insert(0, os.path.dirname(__file__))
