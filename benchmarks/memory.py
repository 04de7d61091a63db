"""Peak memory of a CPU workload, measured in a fresh process (torch's CPU allocator keeps no
statistics, so the process's resident-set high-water mark, VmHWM, is the honest figure; it is
reset to the current resident set just before the work starts)."""

from __future__ import annotations

import multiprocessing as mp


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(queue, setup, work):
    state = setup()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    work(state)
    queue.put(max(0, _status_bytes("VmHWM") - before))


def peak_extra_bytes(setup, work) -> int:
    """Bytes by which work(setup()) raises the peak resident set above what setup() left.

    setup should leave the process warm (one-time initialisations done on a tiny input) and
    not peak above its own end state; setup and work must be picklable (module-level
    functions or functools.partial of them).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, setup, work))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return result
