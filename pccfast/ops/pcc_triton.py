"""PCC (SPEC section 1) as fused Triton kernels: backend ``"triton"``.

The naive version materialises ``vhat`` (activation-sized, fp32) and ``R`` (``G*M*M`` floats) and
autograd keeps both until backward. Here only the per-row statistics ``mean, rstd: (G, M)`` fp32
(and ``x`` itself) pass from forward to backward; ``R`` is formed tile by tile in registers, its
``phi`` reduced on the fly, and the tiles are recomputed in backward (flash-attention style:
``R = Vhat Vhat^T / K`` is the score matrix, ``phi'`` the "softmax", ``Vhat`` the values).

Rows and features are read straight from ``x``'s strides (contiguous NCHW and channels_last alike:
the pixel index ``p = h*W + w`` has the single stride ``stride_w`` whenever
``stride_h == W*stride_w``; any other layout is copied to contiguous first).

Kernels and the regimes they handle (``G`` groups of ``M`` rows with ``K`` features):

``_pcc_stats_kernel``          row mean and M2 over K, Chan-combined per chunk (every mode; split
                               over samples for group="batch", whose rows run over N*P features).
``_pcc_tile_kernel``           forward, one program per upper-triangle tile of ``R`` (or of the
                               ``K x K`` feature Gram ``F = Vhat^T Vhat`` for "square" when
                               ``2K <= M``), partial ``sum phi`` per program; backward of that
                               "square" case uses it to store ``F/K`` in a group-chunked scratch.
``_pcc_bwd_rows_kernel``       backward when ``K`` is small (pixel rows: K = C; channel rows of
                               late stages): a row block keeps its ``K`` features (up to
                               ``rows_max_k``; beyond that ``R`` is recomputed per feature chunk)
                               and sweeps the column blocks: ``dvhat += phi'(R_IJ) vhat_J``.
``_pcc_bwd_small_m_kernel``    backward when ``M`` is small and ``K`` large (channel rows of early
                               stages, pixel rows of late ones): a row block accumulates its whole
                               ``(block x M)`` slice of ``R`` over ``K``, then a second pass over
                               ``K`` forms ``dvhat`` and writes ``dx``.
``_pcc_bwd_square_features_kernel``  backward of "square" with ``2K <= M``:
                               ``dvhat = 2a (Vhat F / K - R_ii vhat_i)``.
``_pcc_batch_gram_kernel``     group="batch": ``R`` (C x C) split over samples into partial sums.
``_pcc_batch_apply_kernel``    group="batch" backward: ``dvhat = D vhat`` with ``D`` (C x C) read
                               from memory, one program per (row block, feature block, sample).

The layer-norm backward ``dv = rstd*(dvhat - mean_K(dvhat) - vhat*mean_K(dvhat*vhat))`` is
finished without another reduction over ``K`` via ``mean_K(dvhat*vhat)_i = a sum_j D_ij R_ij`` and
``mean_K(dvhat)_i = a sum_j D_ij mean_K(vhat_j)`` (``D = phi'(R)`` masked, ``a = 2*scale/K``);
the row means of ``vhat`` (zero up to rounding) are accumulated where the kernel streams the rows
anyway and taken as zero in the "square" feature-Gram path.

Regime choice (``backward_regime``): group="batch" -> batch kernels; "square" with ``2K <= M``
-> feature side; padded ``M <= small_m_max`` (512) and ``K > rows_max_k`` (512) -> small_m;
otherwise rows. At ResNet-50 sizes ("abs"): channel rows of 28x28 and larger maps (K >= 784,
C <= 512) are small_m; channel rows of 14x14 and 7x7 maps and pixel rows with C <= 512 are rows
with one feature chunk; pixel rows with C = 1024, 2048 (14x14, 7x7) are small_m. "square" takes
the feature side for channel rows with C >= 2P (e.g. 1024 x 14x14, 512 and 2048 x 7x7) and for
pixel rows with P >= 2C (every 112x112 and 56x56 map, 128 x 28x28).

Precision: fp32 accumulation everywhere. fp32 inputs: the rows are normalised before every
``tl.dot``, in ``input_precision="ieee"`` (matches the reference to ~1e-6). fp16/bf16 inputs: the
R products run on ``x`` itself on the tensor cores (products of 16-bit values are exact in the
fp32 accumulator) and are centred and scaled per tile, ``R = rstd_i rstd_j (sum x_i x_j / K -
mu_i mu_j)``; this is far more accurate than rounding ``vhat`` to 16 bits (~1e-5 against
~1e-3 for bf16) as long as a row's ``|mean|`` stays below ~30 standard deviations (the error grows
like ``eps_fp32 * (mean/std)^2``; post-ReLU/BN activations sit near 1). The ``D @ vhat`` products
and the feature Gram use ``vhat`` rounded to the input's precision; the feature-side product
``vhat (F/K)`` runs in tf32x3 (``F/K`` is nearly ``(M/K) I``: 16-bit rounding of it would stay
in the small part the layer-norm projection leaves). A row that is exactly constant gets
``rstd = 0`` (its ``vhat`` is 0 either way). group="batch_mean" works on the fp32 batch-mean map,
so always in fp32. fp64 input is rejected (TypeError): it runs on the "torch" and "cpu" backends.

Registered as ``torch.ops.pccfast.pcc_triton_forward`` (-> score, mean, rstd) and
``pccfast.pcc_triton_backward`` via ``torch.library.triton_op``, so ``torch.compile`` sees the
kernels, with the autograd formula registered on the forward op. Under ``create_graph=True``
that formula differentiates the reference instead (pcc_reference.pcc_input_gradient), so
double backward is exact, at the reference's memory cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .backends import interpreter_unavailable_reason
from .pcc_options import PCCOptions, check_pcc_input, pair_count, pcc_shape
from .pcc_reference import pcc_input_gradient

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# tl.dot operand types (constexpr codes, so the compiled kernels' signatures stay plain ints).
# DOT_TF32X3: fp32 operands on the tensor cores as three tf32 products (~fp32 accuracy).
DOT_FP32, DOT_FP16, DOT_BF16, DOT_TF32X3 = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block-size policy. The defaults target H100-class GPUs; tests shrink them to reach every
    regime and tile edge at small sizes.

    tile:            side of the R / F tiles and the row blocks (<= 64 keeps registers in check)
    reduce:          chunk of the reduction axis per tl.dot
    rows_max_k:      features a row block keeps in registers in ``_pcc_bwd_rows_kernel``
    small_m_max:     largest padded M for which ``_pcc_bwd_small_m_kernel`` holds a (block x M)
                     slice of R
    scratch_floats:  bound on the fp32 scratch of one launch (F chunks, group="batch" partials)
    target_programs: programs to aim for when splitting group="batch" over samples
    """

    tile: int = 64
    reduce: int = 64
    rows_max_k: int = 512
    small_m_max: int = 512
    scratch_floats: int = 1 << 22
    target_programs: int = 1024


TUNING = Tuning()


@contextlib.contextmanager
def tuning(**changes):
    """Temporarily replaces fields of :data:`TUNING` (for tests and benchmarks)."""
    global TUNING
    saved = TUNING
    TUNING = dataclasses.replace(TUNING, **changes)
    try:
        yield TUNING
    finally:
        TUNING = saved


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation; operands cast to the dot type first."""
    if DOT == 1:
        a = a.to(tl.float16)
        b = b.to(tl.float16)
    elif DOT == 2:
        a = a.to(tl.bfloat16)
        b = b.to(tl.bfloat16)
    elif DOT == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _tile(ptr, rows, feats, M, KP, s_m, s_k, mean, rstd, NORMALIZE: tl.constexpr):
    """x[rows, feats] (raw, the source dtype) or vhat[rows, feats] (fp32), zero outside the
    M x KP matrix: (len(rows), len(feats))."""
    mask = (rows[:, None] < M) & (feats[None, :] < KP)
    v = tl.load(ptr + rows[:, None] * s_m + feats[None, :] * s_k, mask=mask, other=0.0)
    if NORMALIZE:
        v = tl.where(mask, (v.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    return v


@triton.jit
def _tile_t(ptr, rows, feats, M, KP, s_m, s_k, mean, rstd, NORMALIZE: tl.constexpr):
    """The transpose of _tile: (len(feats), len(rows))."""
    mask = (feats[:, None] < KP) & (rows[None, :] < M)
    v = tl.load(ptr + feats[:, None] * s_k + rows[None, :] * s_m, mask=mask, other=0.0)
    if NORMALIZE:
        v = tl.where(mask, (v.to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
    return v


@triton.jit
def _normalize(v, rows, feats, M, KP, mean, rstd):
    """A raw _tile -> vhat (fp32)."""
    mask = (rows[:, None] < M) & (feats[None, :] < KP)
    return tl.where(mask, (v.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _correlation(acc, mu_i, rs_i, mu_j, rs_j, inv_k, RAW: tl.constexpr):
    """R tile from the accumulated products: of vhat (R = acc/K) or, RAW, of x itself
    (R = rstd_i rstd_j (acc/K - mu_i mu_j))."""
    if RAW:
        return (acc * inv_k - mu_i[:, None] * mu_j[None, :]) * (rs_i[:, None] * rs_j[None, :])
    return acc * inv_k


@triton.jit
def _mean_hat(sums, mu, rs, inv_k, RAW: tl.constexpr):
    """mean_K(vhat) from row sums of the tiles (raw or normalised); zero up to rounding."""
    if RAW:
        return (sums * inv_k - mu) * rs
    return sums * inv_k


@triton.jit
def _row_stats(mean_ptr, rstd_ptr, rows, M):
    mask = rows < M
    return (tl.load(mean_ptr + rows, mask=mask, other=0.0),
            tl.load(rstd_ptr + rows, mask=mask, other=0.0))


@triton.jit
def _phi_grad(r, rows_i, rows_j, SQUARE: tl.constexpr, INCLUDE_DIAGONAL: tl.constexpr):
    """D = phi'(R), zero on the diagonal when it is excluded (and wherever R is padding)."""
    if SQUARE:
        d = 2.0 * r
    else:
        d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    if not INCLUDE_DIAGONAL:
        d = tl.where(rows_i[:, None] == rows_j[None, :], 0.0, d)
    return d


@triton.jit
def _exp2i(k):
    """2.0 ** k for int32 k in [-126, 127], exactly (built from the exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pcc_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, shift_ptr,
    M, KP, NSUB, n_per_split, s_g, s_n, s_m, s_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_EXPONENT: tl.constexpr,
):
    """Grid (row blocks, G, splits): mean and M2 = sum (v - mean)^2 of each row over the features
    [n_lo, n_hi) x [0, KP) of its split, chunk by chunk with Chan's combination (no cancellation
    even when |mean| >> std). A row whose values reach 2^SCALE_EXPONENT is summed divided by 2^shift
    (a power of two, raised online as larger values come), so M2 cannot overflow in fp32 (rows
    below that are summed as they are). Output (splits, G, M): mean, M2 / 4^shift, shift."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n_groups = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    base = x_ptr + g.to(tl.int64) * s_g
    count = 0.0
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    shift = tl.zeros((BLOCK_M,), tl.int32)
    n_lo = s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, NSUB)
    for n in range(n_lo, n_hi):
        ptr = base + tl.cast(n, tl.int64) * s_n
        for k0 in range(0, KP, BLOCK_K):
            feats = k0 + tl.arange(0, BLOCK_K)
            feat_mask = feats < KP
            mask = row_mask[:, None] & feat_mask[None, :]
            v = tl.load(ptr + rows[:, None] * s_m + feats[None, :] * s_k, mask=mask, other=0.0)
            v = v.to(tl.float32)
            # frexp exponent of the largest |v| of each row (|v| < 2^e), from its bits
            largest = tl.max(tl.abs(v), 1).to(tl.int32, bitcast=True)
            e = ((largest >> 23) & 0xFF) - 126
            new_shift = tl.maximum(shift, tl.maximum(e - SCALE_EXPONENT, 0))
            down = _exp2i(shift - new_shift)
            mean = mean * down
            m2 = m2 * down * down
            shift = new_shift
            v = v * _exp2i(-shift)[:, None]
            nb = tl.sum(tl.where(feat_mask, 1.0, 0.0), 0)
            block_mean = tl.sum(v, 1) / nb
            centered = tl.where(mask, v - block_mean[:, None], 0.0)
            block_m2 = tl.sum(centered * centered, 1)
            total = count + nb
            delta = block_mean - mean
            mean += delta * (nb / total)
            m2 += block_m2 + delta * delta * (count * nb / total)
            count = total
    out = (s * n_groups + g) * M + rows
    tl.store(mean_ptr + out, mean * _exp2i(shift), mask=row_mask)
    tl.store(m2_ptr + out, m2, mask=row_mask)
    tl.store(shift_ptr + out, shift, mask=row_mask)


@triton.jit
def _pcc_tile_kernel(
    x_ptr, mean_ptr, rstd_ptr, out_ptr,
    M, KP, g0, s_g, s_m, s_k, inv_k,
    TRANSPOSED: tl.constexpr, SQUARE: tl.constexpr, INCLUDE_DIAGONAL: tl.constexpr,
    STORE_TILE: tl.constexpr, RAW: tl.constexpr, DOT: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (blocks, blocks, G); programs below the diagonal exit at once (R and F are symmetric).

    TRANSPOSED=False: the tile R[I, J] over the KP features (RAW: a plain GEMM of x, normalised
    afterwards); its sum of phi, doubled off the diagonal blocks, goes to out[g, I, J]
    (G, blocks, blocks).
    TRANSPOSED=True: the tile F[A, B] / K = sum over the M rows of vhat[:, A]^T vhat[:, B] / K
    (the feature side); sum of its squares to out[g, A, B] or, with STORE_TILE, the tile itself
    to out (G, KP, KP), both triangles. Program g handles group g0 + g."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    g = tl.program_id(2)
    if pid_j < pid_i:
        return
    n_blocks = tl.num_programs(0)
    base = x_ptr + (g0 + g).to(tl.int64) * s_g
    mean_g = mean_ptr + (g0 + g) * M
    rstd_g = rstd_ptr + (g0 + g) * M
    idx_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    idx_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    if TRANSPOSED:
        for m0 in range(0, M, BLOCK_R):
            rows = m0 + tl.arange(0, BLOCK_R)
            mu, rs = _row_stats(mean_g, rstd_g, rows, M)
            a = _tile(base, rows, idx_i, M, KP, s_m, s_k, mu, rs, True)
            b = _tile(base, rows, idx_j, M, KP, s_m, s_k, mu, rs, True)
            acc = _mma(tl.trans(a), b, acc, DOT)
        t = acc * inv_k
    else:
        mu_i, rs_i = _row_stats(mean_g, rstd_g, idx_i, M)
        mu_j, rs_j = _row_stats(mean_g, rstd_g, idx_j, M)
        for k0 in range(0, KP, BLOCK_R):
            feats = k0 + tl.arange(0, BLOCK_R)
            a = _tile(base, idx_i, feats, M, KP, s_m, s_k, mu_i, rs_i, not RAW)
            bt = _tile_t(base, idx_j, feats, M, KP, s_m, s_k, mu_j, rs_j, not RAW)
            acc = _mma(a, bt, acc, DOT)
        t = _correlation(acc, mu_i, rs_i, mu_j, rs_j, inv_k, RAW)
    if STORE_TILE:
        out_g = out_ptr + g.to(tl.int64) * KP * KP
        mask = (idx_i[:, None] < KP) & (idx_j[None, :] < KP)
        tl.store(out_g + idx_i[:, None] * KP + idx_j[None, :], t, mask=mask)
        if pid_j != pid_i:
            mask_t = (idx_j[:, None] < KP) & (idx_i[None, :] < KP)
            tl.store(out_g + idx_j[:, None] * KP + idx_i[None, :], tl.trans(t), mask=mask_t)
    else:
        if SQUARE:
            phi = t * t
        else:
            phi = tl.abs(t)
        if not TRANSPOSED and not INCLUDE_DIAGONAL:
            phi = tl.where(idx_i[:, None] == idx_j[None, :], 0.0, phi)
        total = tl.sum(tl.sum(phi, 1), 0) * tl.where(pid_j > pid_i, 2.0, 1.0)
        tl.store(out_ptr + (g * n_blocks + pid_i) * n_blocks + pid_j, total)


@triton.jit
def _pcc_bwd_rows_kernel(
    x_ptr, mean_ptr, rstd_ptr, dx_ptr, grad_ptr,
    M, KP, s_g, s_m, s_k, d_g, d_m, d_k, inv_k, coef,
    SQUARE: tl.constexpr, INCLUDE_DIAGONAL: tl.constexpr, RAW: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KC: tl.constexpr, SINGLE: tl.constexpr,
):
    """Grid (row blocks, feature chunks, G). dx for the rows I and the features of chunk c:
    sweep all column blocks J, form R_IJ (SINGLE: from the chunk itself, which then holds every
    feature; else recomputed over all KP), D_IJ = phi'(R_IJ), and accumulate D_IJ vhat_J[:, c],
    sum_j D_ij R_ij and sum_j D_ij mean(vhat_j)."""
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)
    base = x_ptr + g.to(tl.int64) * s_g
    mean_g = mean_ptr + g * M
    rstd_g = rstd_ptr + g * M
    a_scale = tl.load(grad_ptr).to(tl.float32) * coef
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    mu_i, rs_i = _row_stats(mean_g, rstd_g, rows_i, M)
    cols = pid_c * BLOCK_KC + tl.arange(0, BLOCK_KC)
    a_raw = _tile(base, rows_i, cols, M, KP, s_m, s_k, mu_i, rs_i, False)
    if RAW:
        a_dot = a_raw  # 16-bit; normalised only at the end, to spare registers in the sweep
    else:
        a_dot = _normalize(a_raw, rows_i, cols, M, KP, mu_i, rs_i)
    acc = tl.zeros((BLOCK_M, BLOCK_KC), tl.float32)
    dr = tl.zeros((BLOCK_M,), tl.float32)
    dm = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, M, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        mu_j, rs_j = _row_stats(mean_g, rstd_g, rows_j, M)
        b_raw = _tile(base, rows_j, cols, M, KP, s_m, s_k, mu_j, rs_j, False)
        b_c = _normalize(b_raw, rows_j, cols, M, KP, mu_j, rs_j)
        if SINGLE:
            if RAW:
                b_dot = b_raw
            else:
                b_dot = b_c
            acc_r = _mma(a_dot, tl.trans(b_dot), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT)
            sums = tl.sum(b_dot.to(tl.float32), 1)
        else:
            acc_r = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            sums = tl.zeros((BLOCK_N,), tl.float32)
            for k0 in range(0, KP, BLOCK_K):
                feats = k0 + tl.arange(0, BLOCK_K)
                a = _tile(base, rows_i, feats, M, KP, s_m, s_k, mu_i, rs_i, not RAW)
                bt = _tile_t(base, rows_j, feats, M, KP, s_m, s_k, mu_j, rs_j, not RAW)
                acc_r = _mma(a, bt, acc_r, DOT)
                sums += tl.sum(bt.to(tl.float32), 0)
        r = _correlation(acc_r, mu_i, rs_i, mu_j, rs_j, inv_k, RAW)
        mbar = _mean_hat(sums, mu_j, rs_j, inv_k, RAW)
        d = _phi_grad(r, rows_i, rows_j, SQUARE, INCLUDE_DIAGONAL)
        dr += tl.sum(d * r, 1)
        dm += tl.sum(d * mbar[None, :], 1)
        acc = _mma(d, b_c, acc, DOT)
    a_c = _normalize(a_raw, rows_i, cols, M, KP, mu_i, rs_i)
    dv = (acc - dm[:, None] - a_c * dr[:, None]) * (rs_i * a_scale)[:, None]
    mask = (rows_i[:, None] < M) & (cols[None, :] < KP)
    dx = dx_ptr + g.to(tl.int64) * d_g + rows_i[:, None] * d_m + cols[None, :] * d_k
    tl.store(dx, dv.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pcc_bwd_small_m_kernel(
    x_ptr, mean_ptr, rstd_ptr, dx_ptr, grad_ptr,
    M, KP, s_g, s_m, s_k, d_g, d_m, d_k, inv_k, coef,
    SQUARE: tl.constexpr, INCLUDE_DIAGONAL: tl.constexpr, RAW: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_MP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row blocks, G), all M rows in one padded block of BLOCK_MP columns. Pass 1 over the
    features accumulates R[I, :] (BLOCK_M x BLOCK_MP) and the row means of vhat; pass 2 forms
    dvhat = D[I, :] vhat chunk by chunk and writes dx."""
    pid_i = tl.program_id(0)
    g = tl.program_id(1)
    base = x_ptr + g.to(tl.int64) * s_g
    mean_g = mean_ptr + g * M
    rstd_g = rstd_ptr + g * M
    a_scale = tl.load(grad_ptr).to(tl.float32) * coef
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_MP)
    mu_i, rs_i = _row_stats(mean_g, rstd_g, rows_i, M)
    mu_c, rs_c = _row_stats(mean_g, rstd_g, cols, M)
    acc_r = tl.zeros((BLOCK_M, BLOCK_MP), tl.float32)
    sums = tl.zeros((BLOCK_MP,), tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        a = _tile(base, rows_i, feats, M, KP, s_m, s_k, mu_i, rs_i, not RAW)
        bt = _tile_t(base, cols, feats, M, KP, s_m, s_k, mu_c, rs_c, not RAW)
        acc_r = _mma(a, bt, acc_r, DOT)
        sums += tl.sum(bt.to(tl.float32), 0)
    r = _correlation(acc_r, mu_i, rs_i, mu_c, rs_c, inv_k, RAW)
    mbar = _mean_hat(sums, mu_c, rs_c, inv_k, RAW)
    d = _phi_grad(r, rows_i, cols, SQUARE, INCLUDE_DIAGONAL)
    dr = tl.sum(d * r, 1)
    dm = tl.sum(d * mbar[None, :], 1)
    scale = rs_i * a_scale
    dx_g = dx_ptr + g.to(tl.int64) * d_g
    for k0 in range(0, KP, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        b = _tile(base, cols, feats, M, KP, s_m, s_k, mu_c, rs_c, True)
        dvhat = _mma(d, b, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), DOT)
        a = _tile(base, rows_i, feats, M, KP, s_m, s_k, mu_i, rs_i, True)
        dv = (dvhat - dm[:, None] - a * dr[:, None]) * scale[:, None]
        mask = (rows_i[:, None] < M) & (feats[None, :] < KP)
        tl.store(dx_g + rows_i[:, None] * d_m + feats[None, :] * d_k,
                 dv.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _features_product(base, f_g, rows_i, cols, mu_i, rs_i, M, KP, s_m, s_k, DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_KC: tl.constexpr):
    """(vhat_I (F/K))[:, cols] = (R vhat)[I, cols]: (BLOCK_M, BLOCK_KC)."""
    u = tl.zeros((BLOCK_M, BLOCK_KC), tl.float32)
    for l0 in range(0, KP, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        a = _tile(base, rows_i, ls, M, KP, s_m, s_k, mu_i, rs_i, True)
        f_mask = (ls[:, None] < KP) & (cols[None, :] < KP)
        f = tl.load(f_g + ls[:, None] * KP + cols[None, :], mask=f_mask, other=0.0)
        u = _mma(a, f, u, DOT)
    return u


@triton.jit
def _pcc_bwd_square_features_kernel(
    x_ptr, mean_ptr, rstd_ptr, f_ptr, dx_ptr, grad_ptr,
    M, KP, g0, s_g, s_m, s_k, d_g, d_m, d_k, inv_k, coef,
    INCLUDE_DIAGONAL: tl.constexpr, DOT: tl.constexpr, FEATURES_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_L: tl.constexpr, NUM_KC: tl.constexpr,
):
    """Grid (row blocks, groups of this chunk). "square" through the feature side:
    dvhat_i = 2a (u_i - R_ii vhat_i) with u = vhat F / K = R vhat, and
    sum_j D_ij R_ij = 2 (u_i . vhat_i / K - R_ii^2) (R_ii terms only when the diagonal is
    excluded). With several feature chunks a first sweep gathers the per-row sums. Program g
    handles group g0 + g, whose F / K is f[g]. FEATURES_DOT is never 16-bit: F / K is about
    (M / K) I plus a small part, and the projection removes most of u, so 16-bit rounding of F
    would stay in what is left (2.9e-2 relative error in bf16 at 64 x 112x112 pixel rows)."""
    pid_i = tl.program_id(0)
    g = tl.program_id(1)
    f_g = f_ptr + g.to(tl.int64) * KP * KP
    g = g0 + g
    base = x_ptr + g.to(tl.int64) * s_g
    mean_g = mean_ptr + g * M
    rstd_g = rstd_ptr + g * M
    a_scale = tl.load(grad_ptr).to(tl.float32) * coef
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    mu_i, rs_i = _row_stats(mean_g, rstd_g, rows_i, M)
    q = tl.zeros((BLOCK_M,), tl.float32)
    rii = tl.zeros((BLOCK_M,), tl.float32)
    if NUM_KC > 1:
        for c in range(0, NUM_KC):
            cols = c * BLOCK_KC + tl.arange(0, BLOCK_KC)
            u = _features_product(base, f_g, rows_i, cols, mu_i, rs_i, M, KP, s_m, s_k,
                                  FEATURES_DOT, BLOCK_M, BLOCK_L, BLOCK_KC)
            vi = _tile(base, rows_i, cols, M, KP, s_m, s_k, mu_i, rs_i, True)
            q += tl.sum(u * vi, 1)
            rii += tl.sum(vi * vi, 1)
    scale = 2.0 * rs_i * a_scale
    dx_g = dx_ptr + g.to(tl.int64) * d_g
    for c in range(0, NUM_KC):
        cols = c * BLOCK_KC + tl.arange(0, BLOCK_KC)
        u = _features_product(base, f_g, rows_i, cols, mu_i, rs_i, M, KP, s_m, s_k,
                              FEATURES_DOT, BLOCK_M, BLOCK_L, BLOCK_KC)
        vi = _tile(base, rows_i, cols, M, KP, s_m, s_k, mu_i, rs_i, True)
        if NUM_KC == 1:
            q = tl.sum(u * vi, 1)
            rii = tl.sum(vi * vi, 1)
        sum_r2 = q * inv_k
        r_ii = rii * inv_k
        if INCLUDE_DIAGONAL:
            dvhat = u
            dr = sum_r2
        else:
            dvhat = u - r_ii[:, None] * vi
            dr = sum_r2 - r_ii * r_ii
        dv = (dvhat - vi * dr[:, None]) * scale[:, None]
        mask = (rows_i[:, None] < M) & (cols[None, :] < KP)
        tl.store(dx_g + rows_i[:, None] * d_m + cols[None, :] * d_k,
                 dv.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pcc_batch_gram_kernel(
    x_ptr, mean_ptr, rstd_ptr, gram_ptr, rowsum_ptr,
    M, KP, NSUB, n_per_split, s_n, s_m, s_k,
    RAW: tl.constexpr, DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (blocks, blocks, splits), group="batch": the split's partial sums over its samples
    of the row products (of x when RAW, else of vhat; both triangles) to gram[s]
    (splits, M, M), and of the rows to rowsum[s] (splits, M)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    s = tl.program_id(2)
    if pid_j < pid_i:
        return
    idx_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    idx_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mu_i, rs_i = _row_stats(mean_ptr, rstd_ptr, idx_i, M)
    mu_j, rs_j = _row_stats(mean_ptr, rstd_ptr, idx_j, M)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    row_sum = tl.zeros((BLOCK,), tl.float32)
    n_lo = s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, NSUB)
    for n in range(n_lo, n_hi):
        ptr = x_ptr + tl.cast(n, tl.int64) * s_n
        for k0 in range(0, KP, BLOCK_R):
            feats = k0 + tl.arange(0, BLOCK_R)
            a = _tile(ptr, idx_i, feats, M, KP, s_m, s_k, mu_i, rs_i, not RAW)
            bt = _tile_t(ptr, idx_j, feats, M, KP, s_m, s_k, mu_j, rs_j, not RAW)
            acc = _mma(a, bt, acc, DOT)
            row_sum += tl.sum(a.to(tl.float32), 1)
    out = gram_ptr + s.to(tl.int64) * M * M
    mask = (idx_i[:, None] < M) & (idx_j[None, :] < M)
    tl.store(out + idx_i[:, None] * M + idx_j[None, :], acc, mask=mask)
    if pid_j != pid_i:
        mask_t = (idx_j[:, None] < M) & (idx_i[None, :] < M)
        tl.store(out + idx_j[:, None] * M + idx_i[None, :], tl.trans(acc), mask=mask_t)
    else:
        tl.store(rowsum_ptr + s * M + idx_i, row_sum, mask=idx_i < M)


@triton.jit
def _pcc_batch_apply_kernel(
    x_ptr, mean_ptr, rstd_ptr, d_ptr, dr_ptr, dm_ptr, dx_ptr, grad_ptr,
    M, KP, s_n, s_m, s_k, d_n, d_m, d_k, coef,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row blocks, feature blocks, N), group="batch": dx = rstd a (D vhat - dm - vhat dr)
    with D (M x M), dr = sum_j D_ij R_ij and dm = sum_j D_ij mean(vhat_j) precomputed."""
    pid_i = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = tl.program_id(2)
    ptr = x_ptr + n.to(tl.int64) * s_n
    a_scale = tl.load(grad_ptr).to(tl.float32) * coef
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mu_i, rs_i = _row_stats(mean_ptr, rstd_ptr, rows_i, M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for j0 in range(0, M, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        mu_j, rs_j = _row_stats(mean_ptr, rstd_ptr, rows_j, M)
        d_mask = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        d = tl.load(d_ptr + rows_i[:, None] * M + rows_j[None, :], mask=d_mask, other=0.0)
        b = _tile(ptr, rows_j, feats, M, KP, s_m, s_k, mu_j, rs_j, True)
        acc = _mma(d, b, acc, DOT)
    a = _tile(ptr, rows_i, feats, M, KP, s_m, s_k, mu_i, rs_i, True)
    dr, dm = _row_stats(dr_ptr, dm_ptr, rows_i, M)
    dv = (acc - dm[:, None] - a * dr[:, None]) * (rs_i * a_scale)[:, None]
    mask = (rows_i[:, None] < M) & (feats[None, :] < KP)
    dx = dx_ptr + n.to(tl.int64) * d_n + rows_i[:, None] * d_m + feats[None, :] * d_k
    tl.store(dx, dv.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side: addressing, regimes, launchers
# ------------------------------------------------------------------------------------------------


def _launcher(kernel):
    """kernel[grid](...) as torch.compile can trace it; interpreted kernels are launched as they
    are (they cannot be traced, and older torch versions refuse to wrap them)."""
    return kernel if INTERPRET else wrap_triton(kernel)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else max(lo, min(p, hi))


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(v, hi))


def dot_kind(dtype: torch.dtype) -> int:
    """tl.dot operand type for a source dtype (bf16 dot is wrong under the interpreter)."""
    if dtype == torch.float16:
        return DOT_FP16
    if dtype == torch.bfloat16 and not INTERPRET:
        return DOT_BF16
    return DOT_FP32


def features_dot_kind(kind: int) -> int:
    """The dot of the "square" feature-side product vhat (F / K): fp32 for fp32 sources, tf32x3
    on the tensor cores for 16-bit ones (the interpreter runs every dot in fp32)."""
    return DOT_FP32 if kind == DOT_FP32 or INTERPRET else DOT_TF32X3


def _pixel_stride(t: torch.Tensor) -> int | None:
    """The one stride of p = h*W + w, or None when the layout has none."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


@dataclasses.dataclass(frozen=True)
class _Problem:
    """How the kernels see ``src`` (N, C, H, W): G groups of M rows; each row's features are
    NSUB sub-blocks (samples, group="batch" only) of KP entries.
    Element (g, row, n, k) lives at g*s_g + n*s_n + row*s_m + k*s_k."""

    groups: int
    rows: int
    kp: int
    nsub: int
    s_g: int
    s_n: int
    s_m: int
    s_k: int

    @property
    def features(self) -> int:
        return self.nsub * self.kp


def _problem(t: torch.Tensor, opts: PCCOptions) -> _Problem:
    n, c, h, w = t.shape
    sp = _pixel_stride(t)
    assert sp is not None, "layout without a pixel stride must be made contiguous first"
    if opts.orientation == "pixel":
        return _Problem(n, h * w, c, 1, t.stride(0), 0, sp, t.stride(1))
    if opts.group == "batch":
        return _Problem(1, c, h * w, n, 0, t.stride(0), t.stride(1), sp)
    return _Problem(n, c, h * w, 1, t.stride(0), 0, t.stride(1), sp)


def _source(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """What the groups are drawn from: x (read in place when it has a pixel stride), or the fp32
    batch-mean map (1, C, H, W) for group="batch_mean"."""
    if opts.group == "batch_mean":  # summed in fp64, which no fp32/16-bit batch can overflow
        x = x.sum(dim=0, keepdim=True, dtype=torch.float64).div_(x.shape[0]).to(torch.float32)
    if _pixel_stride(x) is None or _sample_span(x) > MAX_INT32_OFFSET:
        x = x.contiguous()
    return x


# The kernels index within one sample in int32 (the sample offset is int64): a layout whose
# sample spans more than this, such as a (C, N, H, W) tensor viewed as (N, C, H, W), is copied.
MAX_INT32_OFFSET = 2**31 - 1


def _sample_span(t: torch.Tensor) -> int:
    return sum((d - 1) * abs(s) for d, s in zip(t.shape[1:], t.stride()[1:]))


def uses_feature_gram(rows: int, features: int, opts: PCCOptions) -> bool:
    """"square" goes through the K x K side when it is at most half the M x M one (closer than
    that the subtraction of the diagonal would cost accuracy for little gain)."""
    return opts.penalty == "square" and opts.group != "batch" and 2 * features <= rows


def backward_regime(rows: int, features: int, opts: PCCOptions) -> str:
    """Which backward kernel runs: "batch", "square_features", "small_m" or "rows"."""
    if opts.group == "batch":
        return "batch"
    if uses_feature_gram(rows, features, opts):
        return "square_features"
    if _pow2(rows) <= TUNING.small_m_max and features > TUNING.rows_max_k:
        return "small_m"
    return "rows"


# Rows whose largest |entry| reaches 2^STATS_SCALE_EXPONENT are summed scaled down by a power of
# two (so their M2 stays below ~2^(2*33) * K), with eps scaled alike: every fp32 value works.
STATS_SCALE_EXPONENT = 32


def _stats(src: torch.Tensor, prob: _Problem, eps: float):
    """(mean, rstd, r_ii): (G, M) fp32 each; r_ii = var / (var + eps), R's diagonal."""
    g, m = prob.groups, prob.rows
    block_k = _pow2(prob.kp, lo=16, hi=256)
    block_m = _clamp(2048 // block_k, 1, _pow2(m, lo=1, hi=128))
    row_blocks = triton.cdiv(m, block_m)
    splits = 1
    if prob.nsub > 1:
        splits = _clamp(TUNING.target_programs // max(row_blocks * g, 1), 1, prob.nsub)
    n_per = triton.cdiv(prob.nsub, splits)
    splits = triton.cdiv(prob.nsub, n_per)
    mean = torch.empty((splits, g, m), device=src.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    shift = torch.empty_like(mean, dtype=torch.int32)
    _launcher(_pcc_stats_kernel)[(row_blocks, g, splits)](
        src, mean, m2, shift, m, prob.kp, prob.nsub, n_per, prob.s_g, prob.s_n, prob.s_m,
        prob.s_k, BLOCK_M=block_m, BLOCK_K=block_k, SCALE_EXPONENT=STATS_SCALE_EXPONENT,
        num_warps=4,
    )
    k = prob.features
    shift = shift.to(torch.float32)
    if splits == 1:
        mean, m2, shift = mean[0], m2[0], shift[0]
    else:  # Chan's combination of the splits' (count, mean, M2), in units of the largest scale
        # per-split feature counts, filled on the device (a host tensor would be a blocking copy)
        w = torch.full((splits, 1, 1), float(n_per * prob.kp), device=src.device)
        w[-1] = float((prob.nsub - (splits - 1) * n_per) * prob.kp)
        top = shift.amax(0)
        down = torch.exp2(shift - top)
        m2 = m2 * down * down
        scaled_mean = mean * torch.exp2(-top)
        total_mean = (w * scaled_mean).sum(0) / k
        m2 = (m2 + w * (scaled_mean - total_mean).square()).sum(0)
        mean, shift = total_mean * torch.exp2(top), top
    var = m2 / k  # var / 4^shift
    # An exactly constant row has vhat = 0 whatever its rstd; rstd = 0 makes that exact in the
    # raw-product path too (acc/K - mu_i mu_j is only zero up to rounding).
    scaled_eps = eps * torch.exp2(-2 * shift)
    rstd = torch.where(var > 0, torch.rsqrt(var + scaled_eps), torch.zeros_like(var))
    r_ii = var * rstd.square()
    return mean, rstd * torch.exp2(-shift), r_ii


def uses_raw_products(dtype: torch.dtype) -> bool:
    """fp16/bf16 sources: the R GEMMs run on x itself (exact products in fp32 accumulators,
    centred and scaled per tile afterwards); fp32 sources are normalised first (ieee dot)."""
    return dtype in (torch.float16, torch.bfloat16)


def _launch_opts(kind: int, elements: int = 0) -> dict:
    """num_warps by the largest register tile (elements per program), pipelining by dot type."""
    return {"num_warps": 8 if elements >= 4096 else 4, "num_stages": 2 if kind == DOT_FP32 else 3}


def _forward_rows(src, prob, mean, rstd, opts, kind) -> torch.Tensor:
    """sum over groups and (masked) pairs of phi(R), as fp64 0-d."""
    t = TUNING
    block = _pow2(prob.rows, hi=t.tile)
    block_r = _pow2(prob.kp, hi=t.reduce)
    nb = triton.cdiv(prob.rows, block)
    partial = torch.zeros((prob.groups, nb, nb), device=src.device, dtype=torch.float32)
    _launcher(_pcc_tile_kernel)[(nb, nb, prob.groups)](
        src, mean, rstd, partial, prob.rows, prob.kp, 0, prob.s_g, prob.s_m, prob.s_k,
        1.0 / prob.features,
        TRANSPOSED=False, SQUARE=opts.penalty == "square",
        INCLUDE_DIAGONAL=opts.include_diagonal, STORE_TILE=False,
        RAW=uses_raw_products(src.dtype), DOT=kind,
        BLOCK=block, BLOCK_R=block_r, **_launch_opts(kind),
    )
    return partial.sum(dtype=torch.float64)


def _feature_blocks(prob):
    t = TUNING
    return _pow2(prob.kp, hi=t.tile), _pow2(prob.rows, hi=t.reduce)


def _forward_square_features(src, prob, mean, r_ii, rstd, opts, kind) -> torch.Tensor:
    """sum_ij R_ij^2 = ||F||_F^2 / K^2 with F = Vhat^T Vhat (K x K), minus sum_i R_ii^2."""
    block, block_r = _feature_blocks(prob)
    nb = triton.cdiv(prob.kp, block)
    partial = torch.zeros((prob.groups, nb, nb), device=src.device, dtype=torch.float32)
    _launcher(_pcc_tile_kernel)[(nb, nb, prob.groups)](
        src, mean, rstd, partial, prob.rows, prob.kp, 0, prob.s_g, prob.s_m, prob.s_k,
        1.0 / prob.features,
        TRANSPOSED=True, SQUARE=True, INCLUDE_DIAGONAL=True, STORE_TILE=False, RAW=False,
        DOT=kind,
        BLOCK=block, BLOCK_R=block_r, **_launch_opts(kind),
    )
    total = partial.sum(dtype=torch.float64)
    if not opts.include_diagonal:
        total = total - r_ii.double().square().sum()
    return total


def _batch_gram(src, prob, mean, rstd, kind):
    """group="batch": (R (M x M) fp32, row means of vhat (M,))."""
    raw = uses_raw_products(src.dtype)
    t = TUNING
    m = prob.rows
    block = _pow2(m, hi=t.tile)
    block_r = _pow2(prob.kp, hi=t.reduce)
    nb = triton.cdiv(m, block)
    tiles = nb * (nb + 1) // 2
    splits = _clamp(t.target_programs // tiles, 1, prob.nsub)
    splits = min(splits, max(1, t.scratch_floats // (m * m)))
    n_per = triton.cdiv(prob.nsub, splits)
    splits = triton.cdiv(prob.nsub, n_per)
    gram = torch.empty((splits, m, m), device=src.device, dtype=torch.float32)
    rowsum = torch.empty((splits, m), device=src.device, dtype=torch.float32)
    _launcher(_pcc_batch_gram_kernel)[(nb, nb, splits)](
        src, mean, rstd, gram, rowsum, m, prob.kp, prob.nsub, n_per, prob.s_n, prob.s_m,
        prob.s_k, RAW=raw, DOT=kind, BLOCK=block, BLOCK_R=block_r, **_launch_opts(kind),
    )
    k = prob.features
    gram, rowsum = gram.sum(0) / k, rowsum.sum(0) / k
    if raw:
        mu, rs = mean.view(-1), rstd.view(-1)
        gram = (gram - mu[:, None] * mu[None, :]) * (rs[:, None] * rs[None, :])
        rowsum = (rowsum - mu) * rs
    return gram, rowsum


def _masked_phi(r: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    phi = r.square() if opts.penalty == "square" else r.abs()
    if not opts.include_diagonal:
        phi = phi * (1 - torch.eye(r.shape[-1], device=r.device, dtype=r.dtype))
    return phi


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError(
            'backend "triton" computes in fp32 and does not take float64 input; '
            'float64 runs on the "torch" and "cpu" backends'
        )


def _forward_impl(x: torch.Tensor, opts: PCCOptions):
    check_pcc_input(x, opts)
    _check_dtype(x)
    src = _source(x, opts)
    prob = _problem(src, opts)
    mean, rstd, r_ii = _stats(src, prob, opts.eps)
    kind = dot_kind(src.dtype)
    if opts.group == "batch":
        r, _ = _batch_gram(src, prob, mean, rstd, kind)
        total = _masked_phi(r, opts).sum(dtype=torch.float64)
    elif uses_feature_gram(prob.rows, prob.features, opts):
        total = _forward_square_features(src, prob, mean, r_ii, rstd, opts, kind)
    else:
        total = _forward_rows(src, prob, mean, rstd, opts, kind)
    pairs = prob.groups * pair_count(prob.rows, opts.include_diagonal)
    score = (total / pairs).to(torch.float32)
    return score, mean, rstd


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, mean, rstd, opts: PCCOptions):
    check_pcc_input(x, opts)
    _check_dtype(x)
    src = _source(x, opts)
    prob = _problem(src, opts)
    if mean.shape != (prob.groups, prob.rows) or rstd.shape != mean.shape:
        raise ValueError(
            f"mean and rstd must have shape {(prob.groups, prob.rows)}, got "
            f"{tuple(mean.shape)} and {tuple(rstd.shape)}"
        )
    g, m, kp, k = prob.groups, prob.rows, prob.kp, prob.features
    kind = dot_kind(src.dtype)
    raw = uses_raw_products(src.dtype)
    grad = grad.reshape(1).to(torch.float32)
    mean = mean.contiguous()
    rstd = rstd.contiguous()
    coef = 2.0 / (k * g * pair_count(m, opts.include_diagonal))  # a = grad * coef = 2 scale / K
    batch_mean = opts.group == "batch_mean"
    if batch_mean:
        coef /= x.shape[0]
    dsrc = torch.empty_like(src, dtype=torch.float32 if batch_mean else x.dtype)
    dprob = _problem(dsrc, opts)
    square = opts.penalty == "square"
    diag = opts.include_diagonal
    t = TUNING
    regime = backward_regime(m, k, opts)
    if regime == "batch":
        r, mbar = _batch_gram(src, prob, mean, rstd, kind)
        d = 2 * r if square else torch.sign(r)
        if not diag:
            d = d * (1 - torch.eye(m, device=r.device, dtype=r.dtype))
        dr = (d * r).sum(1)
        dm = d @ mbar
        block_m, block_n = _pow2(m, hi=t.tile), _pow2(m, hi=t.tile)
        block_k = _pow2(kp, hi=t.tile)
        grid = (triton.cdiv(m, block_m), triton.cdiv(kp, block_k), prob.nsub)
        _launcher(_pcc_batch_apply_kernel)[grid](
            src, mean, rstd, d.contiguous(), dr, dm, dsrc, grad,
            m, kp, prob.s_n, prob.s_m, prob.s_k, dprob.s_n, dprob.s_m, dprob.s_k, coef,
            DOT=kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_launch_opts(kind),
        )
    elif regime == "square_features":
        block, block_r = _feature_blocks(prob)
        nb = triton.cdiv(kp, block)
        block_kc = _pow2(kp, hi=t.rows_max_k)
        num_kc = triton.cdiv(kp, block_kc)
        block_m = _clamp(8192 // block_kc, 16, min(t.tile, _pow2(m)))
        block_l = _clamp(4096 // block_kc, 16, min(t.reduce, _pow2(kp)))
        chunk = _clamp(t.scratch_floats // (kp * kp), 1, g)
        scratch = torch.empty((chunk, kp, kp), device=src.device, dtype=torch.float32)
        for g0 in range(0, g, chunk):
            count = min(chunk, g - g0)
            _launcher(_pcc_tile_kernel)[(nb, nb, count)](
                src, mean, rstd, scratch, m, kp, g0, prob.s_g, prob.s_m, prob.s_k, 1.0 / k,
                TRANSPOSED=True, SQUARE=True, INCLUDE_DIAGONAL=True, STORE_TILE=True,
                RAW=False, DOT=kind, BLOCK=block, BLOCK_R=block_r, **_launch_opts(kind),
            )
            _launcher(_pcc_bwd_square_features_kernel)[(triton.cdiv(m, block_m), count)](
                src, mean, rstd, scratch, dsrc, grad, m, kp, g0, prob.s_g, prob.s_m,
                prob.s_k, dprob.s_g, dprob.s_m, dprob.s_k, 1.0 / k, coef,
                INCLUDE_DIAGONAL=diag, DOT=kind, FEATURES_DOT=features_dot_kind(kind),
                BLOCK_M=block_m, BLOCK_KC=block_kc,
                BLOCK_L=block_l, NUM_KC=num_kc, **_launch_opts(kind, block_m * block_kc),
            )
    elif regime == "small_m":
        block_mp = _pow2(m)
        block_m = _clamp(8192 // block_mp, 16, min(32, t.tile))
        block_k = _clamp(8192 // block_mp, 16, min(128, _pow2(kp)))
        _launcher(_pcc_bwd_small_m_kernel)[(triton.cdiv(m, block_m), g)](
            src, mean, rstd, dsrc, grad, m, kp, prob.s_g, prob.s_m, prob.s_k,
            dprob.s_g, dprob.s_m, dprob.s_k, 1.0 / k, coef,
            SQUARE=square, INCLUDE_DIAGONAL=diag, RAW=raw, DOT=kind,
            BLOCK_M=block_m, BLOCK_MP=block_mp, BLOCK_K=block_k,
            **_launch_opts(kind, block_m * block_mp),
        )
    else:
        block_kc = _pow2(kp, hi=t.rows_max_k)
        num_kc = triton.cdiv(kp, block_kc)
        block_m = _clamp(8192 // block_kc, 16, min(t.tile, _pow2(m)))
        block_n = block_m
        block_k = _pow2(kp, hi=t.reduce)
        _launcher(_pcc_bwd_rows_kernel)[(triton.cdiv(m, block_m), num_kc, g)](
            src, mean, rstd, dsrc, grad, m, kp, prob.s_g, prob.s_m, prob.s_k,
            dprob.s_g, dprob.s_m, dprob.s_k, 1.0 / k, coef,
            SQUARE=square, INCLUDE_DIAGONAL=diag, RAW=raw, DOT=kind,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_KC=block_kc,
            SINGLE=num_kc == 1, **_launch_opts(kind, block_m * block_kc),
        )
    if batch_mean:
        dx = torch.empty_like(x)
        dx.copy_(dsrc.expand_as(x))
        return dx
    return dsrc


# ------------------------------------------------------------------------------------------------
# Operators, autograd, entry point
# ------------------------------------------------------------------------------------------------


def _register(name: str, fake):
    """triton_op on real GPUs, so torch.compile traces into the kernels. Under TRITON_INTERPRET=1
    the kernels are InterpretedFunctions that cannot be traced with fake tensors, so the same
    function becomes an opaque custom op with an explicit fake implementation instead."""

    def decorate(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return triton_op(name, mutates_args=())(fn)

    return decorate


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's when they differ (x on cuda:1 in
    a process whose current device is cuda:0 would otherwise launch with foreign pointers)."""
    if (x.device.type == "cuda" and x.device.index is not None and torch.cuda.device_count() > 1
            and x.device.index != torch.cuda.current_device()):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _fake_forward(x, orientation, group, penalty, include_diagonal, eps):
    shape = pcc_shape(x.shape, PCCOptions(orientation, group, penalty, include_diagonal, eps))
    stats = (shape.groups, shape.rows)
    return (x.new_empty((), dtype=torch.float32), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


def _fake_backward(grad_score, x, mean, rstd, orientation, group, penalty, include_diagonal, eps):
    return torch.empty_like(x)


@_register("pccfast::pcc_triton_forward", _fake_forward)
def pcc_triton_forward(
    x: torch.Tensor, orientation: str, group: str, penalty: str, include_diagonal: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) -> (score 0-d fp32, mean (G, M) fp32, rstd (G, M) fp32)."""
    opts = PCCOptions(orientation, group, penalty, include_diagonal, eps)
    with _on_device_of(x):
        return _forward_impl(x, opts)


@_register("pccfast::pcc_triton_backward", _fake_backward)
def pcc_triton_backward(
    grad_score: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    orientation: str, group: str, penalty: str, include_diagonal: bool, eps: float,
) -> torch.Tensor:
    """d score / dx (times grad_score): (N, C, H, W) in x's dtype, recomputed from x, mean, rstd."""
    opts = PCCOptions(orientation, group, penalty, include_diagonal, eps)
    with _on_device_of(x):
        return _backward_impl(grad_score, x, mean, rstd, opts)


def _setup_context(ctx, inputs, output):
    x, orientation, group, penalty, include_diagonal, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.options = (orientation, group, penalty, include_diagonal, eps)


def _backward(ctx, grad_score, grad_mean, grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    if grad_score is None:
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the kernels are not differentiable
        grad_x = pcc_input_gradient(grad_score, x, PCCOptions(*ctx.options))
    else:
        grad_x = torch.ops.pccfast.pcc_triton_backward(grad_score, x, mean, rstd, *ctx.options)
    return grad_x, None, None, None, None, None


pcc_triton_forward.register_autograd(_backward, setup_context=_setup_context)


def check_triton_input(x: torch.Tensor, opts: PCCOptions) -> None:
    check_pcc_input(x, opts)
    _check_dtype(x)
    if x.device.type != "cuda" and not (INTERPRET and x.device.type == "cpu"):
        raise ValueError(
            f'backend "triton" needs a CUDA tensor (or TRITON_INTERPRET=1 before triton is '
            f"imported, for CPU tensors), got x on {x.device}"
        )
    if x.device.type == "cpu" and (reason := interpreter_unavailable_reason()) is not None:
        raise RuntimeError(reason)
    if opts.group == "batch" and x.shape[0] > MAX_GROUPS_PER_LAUNCH:
        raise ValueError(
            f'backend "triton" takes at most {MAX_GROUPS_PER_LAUNCH} samples for group="batch" '
            f'(a CUDA grid limit), got x of shape {tuple(x.shape)}; use backend="torch"'
        )


# CUDA grid axes 1 and 2 hold at most 65535 programs; the kernels put the group (the sample) there.
MAX_GROUPS_PER_LAUNCH = 65535


def pcc_triton(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """x: (N, C, H, W) fp16/bf16/fp32 on CUDA -> S (0-d fp32), differentiable."""
    check_triton_input(x, opts)
    n = x.shape[0]
    if n > MAX_GROUPS_PER_LAUNCH and opts.group == "sample":
        # S is the mean over samples: a weighted mean over chunks, each within the grid limit.
        chunks = x.split(MAX_GROUPS_PER_LAUNCH)
        return sum(pcc_triton(c, opts) * (c.shape[0] / n) for c in chunks)
    score, _, _ = torch.ops.pccfast.pcc_triton_forward(x, *opts.op_args())
    return score
