"""Fused attention: softmax(scale * Q K^T + mask) V, with a plain-PyTorch oracle beside it.

    from kernels import attention
    out = attention(q, k, v, causal=True)      # q (B, Hq, N, D), k / v (B, Hkv, N, D) -> (B, Hq, N, D)

Semantics (identical on every path):
- GQA / MQA: Hq must be a multiple of Hkv; query head h reads key/value head h // (Hq // Hkv).
- causal=True: query i sees keys j <= i (needs as many queries as keys); without it the query and
  key lengths may differ (cross-attention).
- key_lengths: optional integer tensor (B,) of valid key counts for right-padded batches; keys
  j >= key_lengths[b] are invisible. A query row that sees no key at all (key_lengths[b] == 0)
  outputs 0 and gets zero gradients instead of NaN.
- scale: softmax temperature, default 1 / sqrt(D).

Paths: CUDA tensors run the Triton kernels below (FlashAttention-2 in the style of Triton's
fused-attention tutorial, python/tutorials/06-fused-attention.py); other devices run
`F.scaled_dot_product_attention`. KERNELS=triton or KERNELS=ref in the environment forces one path
(the tests run the kernels on CPU through TRITON_INTERPRET=1, set before triton is imported).
`attention_reference` is the fp32 oracle the tests compare against.

The Triton path: head dims 1..128 (padded to a power of two >= 16 inside the kernels), fp16 / bf16 /
fp32 (fp32 matmuls run as TF32 on the GPU, like torch with allow_tf32), any sequence length, inputs
made contiguous (a copy when they are strided views). Memory is O(N): the (N, N) scores never exist;
the forward saves one log-sum-exp per query row and the backward recomputes the probabilities.
On a GPU the first call for each (N, D, dtype, causal) autotunes the tile sizes (a few seconds).
"""
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # runtime installs need only torch: the SDPA path works, the kernels are never launched
    from types import SimpleNamespace
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **_: lambda fn: fn, Config=lambda *a, **k: None)
    tl = SimpleNamespace(constexpr=lambda value=None: value)
    HAS_TRITON = False

# read once, like triton itself decides at import whether @triton.jit compiles or interprets
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_PATHS = ("triton", "ref")


# ----------------------------------------------------------------------------- masks and checks

def _visibility_mask(n_q, n_kv, causal, key_lengths, device):
    """Boolean (B or 1, 1, n_q, n_kv) mask of the keys each query may see, or None when all are visible."""
    mask = None
    if causal:
        mask = torch.ones(n_q, n_kv, dtype=torch.bool, device=device).tril()[None, None]
    if key_lengths is not None:
        valid_key = torch.arange(n_kv, device=device)[None, :] < key_lengths.to(device)[:, None]  # (B, n_kv)
        valid_key = valid_key[:, None, None, :]  # (B, 1, 1, n_kv)
        mask = valid_key if mask is None else mask & valid_key
    return mask


def _check_inputs(q, k, v, causal, key_lengths):
    """Raise ValueError with a one-line reason for shapes / dtypes the op does not define."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (b, h_q, n_q, d), (b_kv, h_kv, n_kv, d_kv) = q.shape, k.shape
    if b != b_kv or d != d_kv:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"attention: query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if causal and n_q != n_kv:
        raise ValueError(f"attention: causal=True needs as many queries as keys, got {n_q} and {n_kv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if key_lengths is not None:
        if key_lengths.shape != (b,) or key_lengths.dtype.is_floating_point or key_lengths.dtype == torch.bool:
            raise ValueError(f"attention: key_lengths must be an integer tensor of shape ({b},), "
                             f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")


# ----------------------------------------------------------------------------- PyTorch paths

def attention_reference(q, k, v, causal=False, scale=None, key_lengths=None, upcast=True):
    """The oracle: materialises the (N, N) scores. upcast=True computes in fp32 (output cast back to
    q.dtype); upcast=False stays in the input dtype (the "same-dtype PyTorch" error the tests allow 2x of)."""
    _check_inputs(q, k, v, causal, key_lengths)
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nkv)
    mask = _visibility_mask(q.shape[2], k.shape[2], causal, key_lengths, q.device)
    if mask is not None:
        # a finite fill keeps rows with no visible key finite (uniform), zeroed just below: no NaN anywhere
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs * mask.any(dim=-1, keepdim=True)
    return (probs @ v).to(out_dtype)


def _sdpa_attention(q, k, v, causal, scale, key_lengths):
    """torch's fused SDPA with the same semantics (used off CUDA, or with KERNELS=ref)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # SDPA's enable_gqa needs torch >= 2.5; repeating is the portable spelling
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = _visibility_mask(q.shape[2], k.shape[2], causal, key_lengths, q.device)  # (B, 1, Nq, Nkv)
    sees_a_key = mask.any(dim=-1, keepdim=True)  # (B, 1, Nq, 1)
    # rows with no visible key attend everywhere (finite, no NaN in forward or backward), then output 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~sees_a_key, scale=scale)
    return out.masked_fill(~sees_a_key, 0.0)


# ----------------------------------------------------------------------------- Triton kernels
# Layout inside the kernels: q, o, do (B*Hq, Nq, D) and k, v (B*Hkv, Nkv, D), contiguous, so a row of
# one head lives at base + row * HEAD_DIM. Scores are kept in log2 units (scale * log2(e) folded in)
# so the softmax uses exp2. LSE[row] = m + log2(l) is what the backward needs to rebuild P = exp2(S - LSE).
# A query that sees no key stores LSE = +inf: its P is 0 everywhere, so its output and gradients are 0.

LOG2_E = 1.4426950408889634
# finite "minus infinity": a fully masked tile never computes (-inf) - (-inf) = NaN. Globals read inside
# @triton.jit must be constexpr.
MASKED_SCORE = tl.constexpr(-1.0e6)


@triton.jit
def _load_rows(base, rows, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a (n_rows, HEAD_DIM) row-major matrix as a (len(rows), BLOCK_D) tile, zero-padded."""
    cols = tl.arange(0, BLOCK_D)
    mask = rows[:, None] < n_rows  # a per-row mask keeps the loads along D vectorised
    if HEAD_DIM != BLOCK_D:  # compile-time: only non-power-of-two head dims pay for the column mask
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * HEAD_DIM + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS: tl.constexpr):
    """How many leading keys of sample b are real (key_lengths clamped to [0, N_KV])."""
    if HAS_LENGTHS:
        return tl.minimum(tl.maximum(tl.load(KeyLen + b).to(tl.int32), 0), N_KV)
    return N_KV


@triton.jit
def _key_ranges(start_m, kv_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key ranges for query rows [start_m, start_m + BLOCK_M): [0, full_end) is visible to every row
    (no mask needed), [full_end, end) needs the causal / length mask, keys >= end are never visible."""
    if CAUSAL:
        end = tl.minimum(kv_len, start_m + BLOCK_M)
        full_end = tl.minimum(kv_len, start_m) // BLOCK_N * BLOCK_N
    else:
        end = kv_len
        full_end = kv_len // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, rows, lo, hi, kv_len, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Online softmax over key blocks [lo, hi): rescale the running sum and output when the max grows."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, kv_len, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, keys, kv_len, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = keys[None, :] < kv_len
            if CAUSAL:
                visible = visible & (rows[:, None] >= keys[None, :])
            s = tl.where(visible, s, MASKED_SCORE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)  # how much the old running max overestimated
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_configs():
    if INTERPRET:  # tiny, unequal tiles: cheap on CPU and still several blocks per test sequence
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # sm_90 (ptxas, bf16): all but (128, 64, 4) and (128, 128, 8) spill-free at D = 128; (64, 32, 4, 2) fits fp32
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]]


@triton.autotune(configs=_fwd_configs(), key=["N_Q", "N_KV", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KeyLen, qk_scale, N_Q, N_KV, H_Q, GROUP,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one (batch, query head). Grid (cdiv(Nq, BLOCK_M), B*Hq)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # b * H_Q + h
    b = bh // H_Q
    bh_kv = bh // GROUP  # = b * H_KV + h // GROUP: the key/value head this query head reads
    q_base = Q + bh.to(tl.int64) * N_Q * HEAD_DIM
    k_base = K + bh_kv.to(tl.int64) * N_KV * HEAD_DIM
    v_base = V + bh_kv.to(tl.int64) * N_KV * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, rows, N_Q, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), stays in registers

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running P @ V
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    full_end, end = _key_ranges(start_m, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, rows, 0, full_end, kv_len, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, rows, full_end, end, kv_len, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL)

    sees_a_key = l_i > 0  # false only when kv_len == 0
    o = acc / tl.where(sees_a_key, l_i, 1.0)[:, None]  # 0 for rows that see no key
    lse = tl.where(sees_a_key, m_i + tl.log2(tl.where(sees_a_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=rows < N_Q)
    _store_rows(O + bh.to(tl.int64) * N_Q * HEAD_DIM, rows, N_Q, o, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, N_Q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[row] = rowsum(O * dO): the softmax backward's dP correction, computed once per row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offset = tl.program_id(1).to(tl.int64) * N_Q
    o = _load_rows(O + offset * HEAD_DIM, rows, N_Q, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + offset * HEAD_DIM, rows, N_Q, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(Delta + offset + rows, tl.sum(o * do, axis=1), mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keys, lo, hi, N_Q, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), in transposed (key-major) form."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, N_Q, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, rows, N_Q, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_base + rows, mask=rows < N_Q, other=float("inf"))  # padding rows get P = 0
        delta = tl.load(delta_base + rows, mask=rows < N_Q, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASKED:  # causal diagonal: query row r sees key c only if r >= c
            p_t = tl.where(rows[None, :] >= keys[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)  # dV = P^T dO
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - Delta)
        dk += tl.dot(ds_t.to(q.dtype), q)  # dK = dS^T Q (times scale, applied once at the end)
    return dk, dv


def _bwd_dkdv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    # BLOCK_N must be a multiple of BLOCK_M: the causal diagonal is walked in BLOCK_M steps. dK, dV, K, V
    # all stay in registers: the tutorial's (32, 128, 4 warps) spills ~1.4 KB per thread at D = 128 on
    # sm_90, these 8-warp tiles at most 16 B (64 x 128 is for D = 64); (32, 64, 4, 2) fits fp32
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 2)]]


@triton.autotune(configs=_bwd_dkdv_configs(), key=["N_Q", "N_KV", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, KeyLen, qk_scale, sm_scale, N_Q, N_KV, H_KV, GROUP,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_N keys of one (batch, kv head); it loops over all GROUP query heads
    that read this kv head, so no two programs write the same dK / dV rows (no atomics).
    Grid (cdiv(Nkv, BLOCK_N), B*Hkv)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)  # b * H_KV + h_kv
    b = bh_kv // H_KV
    kv_offset = bh_kv.to(tl.int64) * N_KV * HEAD_DIM
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + kv_offset, keys, N_KV, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D), resident
    v = _load_rows(V + kv_offset, keys, N_KV, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    # keys >= kv_len only change their own dK / dV rows, zeroed below: no mask needed in the loop,
    # and a block made only of padding keys skips the loop
    n_rows = tl.where(start_n < kv_len, N_Q, 0)
    for g in range(GROUP):
        bh = bh_kv * GROUP + g  # the query head b * H_Q + h with h // GROUP == h_kv
        q_base = Q + bh.to(tl.int64) * N_Q * HEAD_DIM
        do_base = DO + bh.to(tl.int64) * N_Q * HEAD_DIM
        lse_base = LSE + bh.to(tl.int64) * N_Q
        delta_base = Delta + bh.to(tl.int64) * N_Q
        if CAUSAL:  # rows < start_n see none of these keys; rows in the diagonal band need the mask
            diag_end = tl.minimum(start_n + BLOCK_N, n_rows)
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keys, start_n, diag_end,
                                    N_Q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True)
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keys, start_n + BLOCK_N,
                                    n_rows, N_Q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False)
        else:
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keys, 0, n_rows,
                                    N_Q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False)
    is_real_key = keys[:, None] < kv_len
    _store_rows(DK + kv_offset, keys, N_KV, tl.where(is_real_key, dk * sm_scale, 0.0), HEAD_DIM, BLOCK_D)
    _store_rows(DV + kv_offset, keys, N_KV, tl.where(is_real_key, dv, 0.0), HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, rows, lo, hi, kv_len, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, kv_len, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, keys, kv_len, HEAD_DIM, BLOCK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = keys[None, :] < kv_len
            if CAUSAL:
                visible = visible & (rows[:, None] >= keys[None, :])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # dQ = dS K (times scale, applied once at the end)
    return dq


def _bwd_dq_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)  # spill-free on sm_90
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]]


@triton.autotune(configs=_bwd_dq_configs(), key=["N_Q", "N_KV", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, KeyLen, qk_scale, sm_scale, N_Q, N_KV, H_Q, GROUP,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one (batch, query head), the forward's key walk.
    Grid (cdiv(Nq, BLOCK_M), B*Hq)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H_Q
    bh_kv = bh // GROUP
    q_offset = bh.to(tl.int64) * N_Q
    k_base = K + bh_kv.to(tl.int64) * N_KV * HEAD_DIM
    v_base = V + bh_kv.to(tl.int64) * N_KV * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + q_offset * HEAD_DIM, rows, N_Q, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(DO + q_offset * HEAD_DIM, rows, N_Q, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + q_offset + rows, mask=rows < N_Q, other=float("inf"))
    delta = tl.load(Delta + q_offset + rows, mask=rows < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    full_end, end = _key_ranges(start_m, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, rows, 0, full_end, kv_len, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL)
    dq = _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, rows, full_end, end, kv_len, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL)
    _store_rows(DQ + q_offset * HEAD_DIM, rows, N_Q, dq * sm_scale, HEAD_DIM, BLOCK_D)


class FlashAttention(torch.autograd.Function):
    """Triton forward / backward. Inputs already checked by `attention`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_lengths):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, h_q, n_q, head_dim = q.shape
        h_kv, n_kv = k.shape[1], k.shape[2]
        if key_lengths is not None:
            key_lengths = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty((batch, h_q, n_q), device=q.device, dtype=torch.float32)
        shape = dict(N_Q=n_q, N_KV=n_kv, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                     CAUSAL=causal, HAS_LENGTHS=key_lengths is not None)
        key_len_arg = key_lengths if key_lengths is not None else lse  # never read when HAS_LENGTHS is False
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)
        _attn_fwd[grid](q, k, v, o, lse, key_len_arg, scale * LOG2_E, H_Q=h_q, GROUP=h_q // h_kv, **shape)
        ctx.save_for_backward(q, k, v, o, lse, key_lengths)
        ctx.scale, ctx.shape = scale, shape
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, key_lengths = ctx.saved_tensors
        do = do.contiguous()
        batch, h_q, n_q, head_dim = q.shape
        h_kv, n_kv = k.shape[1], k.shape[2]
        shape = ctx.shape
        delta = torch.empty_like(lse)
        preprocess_rows = 16 if INTERPRET else 128
        _attn_bwd_preprocess[(triton.cdiv(n_q, preprocess_rows), batch * h_q)](
            o, do, delta, n_q, HEAD_DIM=head_dim, BLOCK_D=shape["BLOCK_D"], BLOCK_M=preprocess_rows)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        key_len_arg = key_lengths if key_lengths is not None else lse
        qk_scale = ctx.scale * LOG2_E
        grid_kv = lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N"]), batch * h_kv)
        _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, key_len_arg, qk_scale, ctx.scale,
                                H_KV=h_kv, GROUP=h_q // h_kv, **shape)
        grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)
        _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, key_len_arg, qk_scale, ctx.scale,
                             H_Q=h_q, GROUP=h_q // h_kv, **shape)
        return dq, dk, dv, None, None, None


def _triton_attention(q, k, v, causal, scale, key_lengths):
    if not HAS_TRITON:
        raise RuntimeError("attention: the Triton path needs `pip install triton` (or unset KERNELS=triton)")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("attention: Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: the Triton kernels take fp16 / bf16 / fp32, got {q.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"attention: the Triton kernels take head dims up to 128, got {q.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, causal, scale, key_lengths)


# ----------------------------------------------------------------------------- entry point

def attention(q, k, v, causal=False, scale=None, key_lengths=None):
    """softmax(scale * Q K^T + mask) V. q (B, Hq, Nq, D), k / v (B, Hkv, Nkv, D) -> (B, Hq, Nq, D).
    See the module docstring for GQA, causal, key_lengths and the KERNELS override."""
    if torch.is_autocast_enabled(q.device.type):  # like SDPA under autocast: run in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v, causal, key_lengths)
    forced = os.environ.get("KERNELS", "")
    if forced and forced not in KERNEL_PATHS:
        raise ValueError(f"KERNELS={forced!r}: expected one of {', '.join(KERNEL_PATHS)} (or unset)")
    use_triton = forced == "triton" or (not forced and q.is_cuda and HAS_TRITON and q.shape[-1] <= 128)
    if use_triton:
        return _triton_attention(q, k, v, causal, scale, key_lengths)
    return _sdpa_attention(q, k, v, causal, scale, key_lengths)
