"""`pccfast info`, and the package without its compiled extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pccfast
from pccfast.info import collect, format_info
from pccfast.ops import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **env}, timeout=300,
    )


def test_info_lists_versions_and_every_backend():
    info = collect()
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"torch", "cpu", "triton", "cuda"}
    assert info["backends"]["torch"] is None
    text = format_info(info)
    for name in ("torch", "cpu", "triton", "cuda"):
        assert f"  {name} " in text
    if _C.extension() is not None:
        assert "built for torch " + torch.__version__.split("+")[0] in text


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pccfast", "info"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "torch " in out.stdout


def test_works_without_the_extension():
    code = (
        "import torch, pccfast\n"
        "from pccfast.info import format_info\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "s = pccfast.pcc(x); s.backward()\n"
        "ci = pccfast.channel_independence(x.detach())\n"
        "assert ci.shape == (2, 3) and x.grad is not None\n"
        "try:\n"
        "    pccfast.pcc(x, backend='cpu')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
        "print(format_info())\n"
    )
    out = run_python(code, PCCFAST_DISABLE_EXT="1")
    assert out.returncode == 0, out.stderr
    assert ('REFUSED backend "cpu" is unavailable for pcc: disabled by PCCFAST_DISABLE_EXT=1'
            in out.stdout)
    assert "pccfast._C  unavailable: disabled by PCCFAST_DISABLE_EXT=1" in out.stdout


@pytest.mark.skipif(_C.extension() is None, reason="the extension is not built")
def test_extension_build_record():
    info = _C.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    assert (hasattr(torch.ops.pccfast, "pcc_forward")
            and hasattr(torch.ops.pccfast, "channel_independence"))


def test_public_names():
    for name in ("pcc", "pcc_matrix", "PCCLoss", "PCCRegularizer", "channel_independence"):
        assert hasattr(pccfast, name), name


@pytest.mark.parametrize("torch_first", [False, True])
def test_openmp_wait_policy_is_passive_unless_chosen_or_too_late(torch_first):
    """Imported before torch with OMP_WAIT_POLICY unset, pccfast sets PASSIVE (libgomp reads it
    when torch loads it); imported after torch it cannot, and `pccfast info` says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import torch\n" if torch_first else "") + (
        "import os, pccfast\n"
        "from pccfast.info import format_info\n"
        "print('POLICY', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
        "print(format_info())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    if torch_first:
        assert "POLICY None None" in out.stdout
        assert "torch was imported before pccfast" in out.stdout
    else:
        assert "POLICY PASSIVE 1000" in out.stdout
        assert "PASSIVE, GOMP_SPINCOUNT=1000 (set by pccfast" in out.stdout


def test_openmp_wait_policy_from_the_environment_is_kept():
    out = run_python("import os, pccfast; print(os.environ['OMP_WAIT_POLICY'], "
                     "pccfast._openmp.describe())", OMP_WAIT_POLICY="ACTIVE",
                     GOMP_SPINCOUNT="50")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ACTIVE ACTIVE, GOMP_SPINCOUNT=50 (from the environment)"
