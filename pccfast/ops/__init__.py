"""The ops of pccfast, one family per module, each beside its reference.

PCC (pixel-level cross-correlation, SPEC section 1):
    pcc_options      the options and their checks, shared by every backend
    pcc_reference    the definition in plain PyTorch (backend "torch")
    pcc_cpu          compiled C++ CPU kernels (backend "cpu"), csrc/pcc_cpu.cpp
    pcc_triton       fused Triton kernels (backend "triton")

CI (channel independence, SPEC section 2):
    ci_reference     the definition (brute force) and the fast algorithm in PyTorch ("torch")
    ci_compiled      compiled kernels: csrc/ci_cpu.cpp ("cpu"), kernels/ci_cuda.cu ("cuda")
    ci_cuda          the CUDA solver's parts as ops (batched_eigh, small_side_gram) and their
                     CPU emulations (the kernels' own steps, so the numerics test without a GPU)

Plumbing:
    _C               loads the compiled extension and remembers why it is missing
    backends         turns backend="auto" | "torch" | "cpu" | "triton" | "cuda" into a choice
"""

# Every op module is imported here, so that its ops have their fake and autograd implementations
# from `import pccfast` on: registering them at the first call, inside a torch.compile trace,
# would break the graph (and fail fullgraph=True). The Triton kernels (whose import pulls in
# torch._inductor, ~1 s) only where they can run: with a GPU or under TRITON_INTERPRET=1.
import torch as _torch  # noqa: E402

from . import backends, ci_compiled, ci_cuda, pcc_cpu  # noqa: E402,F401

if backends.triton_unavailable_reason(None) is None and (
    backends.triton_interpreted() or _torch.cuda.is_available()
):
    try:
        from . import pcc_triton  # noqa: F401
    except Exception as exc:  # a Triton/torch mismatch must not break pccfast; "triton" says why
        backends.triton_failed(f"pccfast's Triton kernels failed to import ({exc})")
