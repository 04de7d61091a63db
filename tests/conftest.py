import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning threads
# starve each other (a ResNet-56 forward went from 0.03 s to 7.7 s). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # after a short spin (pccfast/_openmp.py)

# torch.compile's on-disk cache keys a graph before a custom operator's autograd is traced, so a
# backward compiled against an older build of pccfast's operators (another schema) would be
# reused: the tests compile into a cache of their own, removed when they end.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pccfast-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# tests/ on the path so test modules can share tests/cases.py.
sys.path.insert(0, os.path.dirname(__file__))
