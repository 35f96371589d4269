"""Fused attention: softmax(scale * Q K^T + mask) V, with a plain-PyTorch oracle beside it.

    from kernels import attention
    out = attention(q, k, v, causal=True)      # q (B, Hq, Nq, D), k / v (B, Hkv, Nkv, D) -> (B, Hq, Nq, D)

Semantics (identical on every path):
- GQA / MQA: Hq must be a multiple of Hkv; query head h reads key/value head h // (Hq // Hkv).
- Positions: query i sits at key position i + (Nkv - Nq), i.e. the queries are the last Nq positions
  (bottom-right alignment, the convention of flash-attn >= 2.1). With Nq == Nkv nothing shifts; with
  Nq < Nkv the queries continue a filled KV cache or are a chunk of a longer prefill.
- causal=True: query i sees keys j <= i + (Nkv - Nq). With Nq > Nkv the first Nq - Nkv queries see no key.
- key_lengths: optional integer tensor (B,) of valid key counts for right-padded batches; keys
  j >= key_lengths[b] are invisible.
- key_mask: optional bool tensor (B, Nkv); key_mask[b, j] = False hides key j of sample b from every
  query (padding anywhere, or the image tokens BDHS hides).
- doc_ids: optional integer tensor (B, Nkv) of per-token document ids for packed sequences; a document is
  a maximal run of equal consecutive ids (the same segments as flash-attn's varlen cu_seqlens, but
  per sample and without host-side offsets), and a query sees only keys of its own document (the
  query's document is that of its key position). Needs Nq <= Nkv.
  Per-token ids rather than cu_seqlens: they live in the (B, N) layout every script batches in,
  combine with padding and causal without index arithmetic, and need no host sync to build.
- The masks combine (a key is visible when every one of them allows it). A query that sees no key
  outputs 0 and gets zero gradients, never NaN.
- scale: softmax temperature, default 1 / sqrt(D).

Paths: CUDA tensors of fp16 / bf16 / fp32 run the Triton kernels below (FlashAttention-2 in the style of
Triton's fused-attention tutorial, python/tutorials/06-fused-attention.py); other devices and dtypes
(fp64 on CUDA included) run `F.scaled_dot_product_attention`. KERNELS=triton / KERNELS=ref forces a path
(kernels/_common.py); the tests run the kernels on CPU through TRITON_INTERPRET=1, where bf16 is an
error (the interpreter cannot compute it). `attention_reference` is the fp32 oracle of the tests.

The Triton path: head dims 1..128 (padded to a power of two >= 16 inside the kernels), fp32 matmuls as
TF32 on the GPU (like torch with allow_tf32), any sequence length, any strides over (B, H, N) (the
transposed views every caller passes are read in place; only a head dim that is not contiguous is
copied). Memory is O(N): the forward saves one log-sum-exp per query row and the backward recomputes
the probabilities. Masking uses a true -inf; a row whose running max is still -inf (no visible key yet)
subtracts 0 instead, so no (-inf) - (-inf) ever happens. Tile sizes are autotuned once per
power-of-two bucket of (Nq, Nkv), with a fixed small tile for Nq <= 16 (kernels/_common.py).
"""
import math

import torch
import torch.nn.functional as F

from kernels._common import (
    HAS_TRITON,  # noqa: F401  (re-exported: the tests skip on it)
    INTERPRET,
    check_triton_can_run,
    length_bucket,
    prune_configs,
    tile_mask,
    tl,
    triton,
    use_triton,
)

MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------- masks and checks

def document_bounds(doc_ids):
    """(B, N) document ids -> (start, end), each (B, N) int64: position j's document is [start[j], end[j])."""
    n = doc_ids.shape[1]
    positions = torch.arange(n, device=doc_ids.device)
    changes = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, N-1): a new document starts at j + 1
    is_first = F.pad(changes, (1, 0), value=True)
    is_last = F.pad(changes, (0, 1), value=True)
    start = torch.where(is_first, positions, 0).cummax(dim=1).values
    end = torch.where(is_last, positions + 1, n).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def visibility_mask(n_q, n_kv, causal=False, key_lengths=None, key_mask=None, doc_ids=None, device=None):
    """Boolean (B or 1, 1, n_q, n_kv) mask of the keys each query may see, or None when all are visible."""
    keys = torch.arange(n_kv, device=device)
    query_pos = torch.arange(n_q, device=device) + (n_kv - n_q)  # bottom-right aligned
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        mask = both(mask, (keys[None, :] <= query_pos[:, None])[None])  # (1, Nq, Nkv)
    if key_lengths is not None:
        mask = both(mask, (keys[None, :] < key_lengths.to(device)[:, None])[:, None, :])  # (B, 1, Nkv)
    if key_mask is not None:
        mask = both(mask, key_mask.to(device)[:, None, :])
    if doc_ids is not None:
        start, _ = document_bounds(doc_ids.to(device))  # a document is identified by its first position
        mask = both(mask, start[:, query_pos, None] == start[:, None, :])  # (B, Nq, Nkv)
    return None if mask is None else mask[:, None]


def _check_inputs(q, k, v, causal, key_lengths, key_mask=None, doc_ids=None):
    """Raise ValueError with a one-line reason for shapes / dtypes the op does not define."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (b, h_q, n_q, d), (b_kv, h_kv, n_kv, d_kv) = q.shape, k.shape
    if b != b_kv or d != d_kv:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"attention: query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    integer = lambda t: not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
    if key_lengths is not None and (key_lengths.shape != (b,) or not integer(key_lengths)):
        raise ValueError(f"attention: key_lengths must be an integer tensor of shape ({b},), "
                         f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")
    if key_mask is not None and (key_mask.shape != (b, n_kv) or key_mask.dtype != torch.bool):
        raise ValueError(f"attention: key_mask must be a bool tensor of shape ({b}, {n_kv}), "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if doc_ids is not None:
        if doc_ids.shape != (b, n_kv) or not integer(doc_ids):
            raise ValueError(f"attention: doc_ids must be an integer tensor of shape ({b}, {n_kv}), "
                             f"got {doc_ids.dtype} {tuple(doc_ids.shape)}")
        if n_q > n_kv:
            raise ValueError(f"attention: doc_ids needs Nq <= Nkv (queries are the last Nq positions), "
                             f"got Nq={n_q}, Nkv={n_kv}")


# ----------------------------------------------------------------------------- PyTorch paths

def attention_reference(q, k, v, causal=False, scale=None, key_lengths=None, upcast=True, key_mask=None,
                        doc_ids=None):
    """The oracle: materialises the (N, N) scores. upcast=True computes in fp32 (output cast back to
    q.dtype); upcast=False stays in the input dtype (the "same-dtype PyTorch" error the tests allow 2x of)."""
    _check_inputs(q, k, v, causal, key_lengths, key_mask, doc_ids)
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nkv)
    mask = visibility_mask(q.shape[2], k.shape[2], causal, key_lengths, key_mask, doc_ids, q.device)
    if mask is not None:
        # -inf, then rows with no visible key get 0 scores (finite, uniform) and a zero output below
        sees_a_key = mask.any(dim=-1, keepdim=True)  # (B, 1, Nq, 1)
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~sees_a_key, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs * sees_a_key
    return (probs @ v).to(out_dtype)


def _sdpa_attention(q, k, v, causal, scale, key_lengths, key_mask=None, doc_ids=None):
    """torch's fused SDPA with the same semantics (off CUDA, for fp64, or with KERNELS=ref)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # SDPA's enable_gqa needs torch >= 2.5; repeating is the portable spelling
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_q, n_kv = q.shape[2], k.shape[2]
    if key_lengths is None and key_mask is None and doc_ids is None and (not causal or n_q == n_kv):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = visibility_mask(n_q, n_kv, causal, key_lengths, key_mask, doc_ids, q.device)  # (B|1, 1, Nq, Nkv)
    sees_a_key = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Nq, 1)
    # rows with no visible key attend everywhere (finite, no NaN in forward or backward), then output 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~sees_a_key, scale=scale)
    return out.masked_fill(~sees_a_key, 0.0)


# ----------------------------------------------------------------------------- Triton kernels
# Addressing: q, k, v, o, do, dq, dk, dv are read through their (batch, head, row) strides, with the head
# dim contiguous; LSE and Delta are (B*Hq, Nq) contiguous. Grids are 1-D (CUDA allows 2^31 - 1 programs
# on x, 65535 on y / z): program id = (batch * heads + head) * row_blocks + row_block.
# Scores are kept in log2 units (scale * log2(e) folded in) so the softmax uses exp2.
# LSE[row] = m + log2(l) is what the backward needs to rebuild P = exp2(S - LSE); a query that sees no
# key stores LSE = +inf, so its P is 0 everywhere and its output and gradients are 0.
# Masks: every mask but key_mask gives a query row one interval [lo, hi) of visible keys (documents
# bound both ends, causal and key_lengths cut hi), so the loops walk only the key blocks some row of the
# tile may see, and skip the mask on the blocks that every row sees whole; key_mask is per key.

LOG2_E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a (n_rows, HEAD_DIM) matrix with row stride stride_row as a (len(rows), BLOCK_D)
    tile, zero-padded. The column mask is compiled in only when HEAD_DIM is not a power of two."""
    cols = tl.arange(0, BLOCK_D)
    mask = tile_mask(rows, n_rows, cols, HEAD_DIM, HEAD_DIM != BLOCK_D)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, stride_row, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = tile_mask(rows, n_rows, cols, HEAD_DIM, HEAD_DIM != BLOCK_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS: tl.constexpr):
    """How many leading keys of sample b are real (key_lengths clamped to [0, N_KV])."""
    if HAS_LENGTHS:
        return tl.minimum(tl.maximum(tl.load(KeyLen + b).to(tl.int32), 0), N_KV)
    return N_KV


@triton.jit
def _row_key_bounds(rows, N_Q, SHIFT, kv_len, doc_start, doc_end, CAUSAL: tl.constexpr,
                    HAS_DOCS: tl.constexpr):
    """Query row r sees keys [lo[r], hi[r]) before key_mask (none when lo >= hi). doc_start / doc_end
    point at this sample's (N_KV,) document bounds; query r sits at key position r + SHIFT."""
    position = rows + SHIFT
    lo = tl.zeros_like(rows)
    hi = tl.zeros_like(rows) + kv_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(hi, position + 1), 0)
    if HAS_DOCS:  # doc_ids need N_Q <= N_KV, so a real row's position is a real key
        lo = tl.load(doc_start + position, mask=rows < N_Q, other=0)
        hi = tl.minimum(hi, tl.load(doc_end + position, mask=rows < N_Q, other=0))
    return lo, hi


@triton.jit
def _key_loop_bounds(lo, hi, rows, N_Q, N_KV, BLOCK_N: tl.constexpr):
    """Split the keys a tile of query rows may see into masked [start, full_lo), unmasked
    [full_lo, full_hi) (blocks every row sees whole) and masked [full_hi, end); all but end are
    multiples of BLOCK_N (or equal to end), so the three loops cover each block once."""
    real = rows < N_Q
    start = tl.min(tl.where(real, lo, N_KV), 0) // BLOCK_N * BLOCK_N
    end = tl.max(tl.where(real, hi, 0), 0)
    full_lo = tl.cdiv(tl.max(tl.where(real, lo, 0), 0), BLOCK_N) * BLOCK_N
    full_hi = tl.min(tl.where(real, hi, N_KV), 0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return start, full_lo, full_hi, end


@triton.jit
def _segment(PART: tl.constexpr, start, full_lo, full_hi, end):
    """Bounds of part 0 (masked head), 1 (unmasked middle) or 2 (masked tail) of a _key_loop_bounds split."""
    if PART == 0:
        return start, full_lo
    elif PART == 1:
        return full_lo, full_hi
    else:
        return full_hi, end


@triton.jit
def _visible(keys, lo, hi, key_mask, N_KV, IN_INTERVAL: tl.constexpr, HAS_DOCS: tl.constexpr,
             HAS_KEY_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) (or broadcastable) mask of the keys each row sees. IN_INTERVAL=False: the
    block is known to lie inside every row's interval, only key_mask can hide keys."""
    visible = keys[None, :] >= 0
    if IN_INTERVAL:
        visible = keys[None, :] < hi[:, None]
        if HAS_DOCS:
            visible = visible & (keys[None, :] >= lo[:, None])
    if HAS_KEY_MASK:
        visible = visible & _key_shown(key_mask, keys, N_KV)[None, :]
    return visible


@triton.jit
def _key_shown(key_mask, keys, N_KV):
    """key_mask[keys] as booleans (False past N_KV)."""
    return tl.load(key_mask + keys, mask=keys < N_KV, other=0) != 0


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, key_mask, lo, hi, start, stop,
                 N_KV, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Online softmax over key blocks [start, stop): rescale the running sum and output when the max grows."""
    for start_n in range(start, stop, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, N_KV, stride_kn, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, keys, N_KV, stride_vn, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED or HAS_KEY_MASK:
            s = tl.where(_visible(keys, lo, hi, key_mask, N_KV, MASKED, HAS_DOCS, HAS_KEY_MASK), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf - 0) = 0, no NaN
        p = tl.exp2(s - m_ref[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_ref)  # how much the old running max overestimated
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_configs():
    if INTERPRET:  # tiny, unequal tiles: cheap on CPU and still several blocks per test sequence
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # sm_90 (ptxas, bf16): all but (128, 64, 4) and (128, 128, 8) spill-free at D = 128; (64, 32, 4, 2) fits
    # fp32; the last one is the decode tile (Nq <= 16), never timed
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                 (64, 32, 4, 2), (16, 64, 4, 2)]]


FWD_CONFIGS = _fwd_configs()
TUNING_KEY = ["N_Q_BUCKET", "N_KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_DOCS", "HAS_KEY_MASK"]


def _prune_fwd(configs, named_args, **kwargs):
    return prune_configs(configs, {**named_args, **kwargs}["N_Q"], decode_config=FWD_CONFIGS[-1])


def _prune_bwd(configs, named_args, **kwargs):
    return prune_configs(configs, {**named_args, **kwargs}["N_Q"])


@triton.autotune(configs=FWD_CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KeyLen, DocStart, DocEnd, KeyMask, qk_scale,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
              stride_vn,
              stride_ob, stride_oh, stride_on, N_Q, N_KV, H_Q, GROUP, SHIFT, N_Q_BUCKET, N_KV_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
              HAS_DOCS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one (batch, query head)."""
    row_blocks = tl.cdiv(N_Q, BLOCK_M)
    bh = tl.program_id(0) // row_blocks  # b * H_Q + h
    start_m = tl.program_id(0) % row_blocks * BLOCK_M
    b, h = bh // H_Q, bh % H_Q
    h_kv = h // GROUP  # the key/value head this query head reads
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    per_key = b.to(tl.int64) * N_KV  # this sample's row of the (B, N_KV) mask tensors
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, rows, N_Q, stride_qn, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), stays in registers

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running P @ V
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    lo, hi = _row_key_bounds(rows, N_Q, SHIFT, kv_len, DocStart + per_key, DocEnd + per_key, CAUSAL, HAS_DOCS)
    start, full_lo, full_hi, end = _key_loop_bounds(lo, hi, rows, N_Q, N_KV, BLOCK_N)
    for part in tl.static_range(3):  # masked head, unmasked middle, masked tail
        lo_n, hi_n = _segment(part, start, full_lo, full_hi, end)
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     KeyMask + per_key,
                                     lo, hi, lo_n, hi_n, N_KV, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     part != 1,
                                     HAS_DOCS, HAS_KEY_MASK)

    sees_a_key = l_i > 0
    o = acc / tl.where(sees_a_key, l_i, 1.0)[:, None]  # 0 for rows that see no key
    lse = tl.where(sees_a_key, m_i + tl.log2(tl.where(sees_a_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=rows < N_Q)
    _store_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, rows, N_Q, stride_on, o,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _program_tile(n_rows, BLOCK: tl.constexpr):
    """(batch * heads + head, first row) of this program in a 1-D grid of row_blocks per head."""
    row_blocks = tl.cdiv(n_rows, BLOCK)
    return tl.program_id(0) // row_blocks, tl.program_id(0) % row_blocks * BLOCK


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                         N_Q, H_Q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[row] = rowsum(O * dO): the softmax backward's dP correction, computed once per row."""
    bh, start_m = _program_tile(N_Q, BLOCK_M)
    b, h = (bh // H_Q).to(tl.int64), (bh % H_Q).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, N_Q, stride_on, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, N_Q, stride_don, HEAD_DIM,
                    BLOCK_D).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * N_Q + rows, tl.sum(o * do, axis=1), mask=rows < N_Q)


@triton.jit
def _query_loop_bounds(start_n, kv_len, N_Q, N_KV, SHIFT, doc_start, doc_end, CAUSAL: tl.constexpr,
                       HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query rows that may see a key of the block [start_n, start_n + BLOCK_N), split like
    _key_loop_bounds: masked [row_lo, full_lo), unmasked [full_lo, full_hi) (rows that see every real key
    of the block), masked [full_hi, row_hi); full_lo and full_hi are whole BLOCK_M steps from row_lo."""
    last_key = tl.minimum(start_n + BLOCK_N, kv_len) - 1  # keys past kv_len only get their rows zeroed
    row_lo, row_hi, full_lo, full_hi = 0, N_Q, 0, N_Q
    if CAUSAL:  # query row r sees key j when j <= r + SHIFT
        row_lo, full_lo = start_n - SHIFT, last_key - SHIFT
    if HAS_DOCS:  # indices clamped in bounds: a block of padding keys has last_key < start_n
        first, last = tl.minimum(start_n, N_KV - 1), tl.maximum(last_key, 0)
        row_lo = tl.maximum(row_lo, tl.load(doc_start + first) - SHIFT)
        row_hi = tl.load(doc_end + last) - SHIFT
        # rows that see the whole block lie in the document of its first key and in that of its last
        # (empty when those differ: the first one ends before the last one starts)
        full_lo = tl.maximum(full_lo, tl.load(doc_start + last) - SHIFT)
        full_hi = tl.load(doc_end + first) - SHIFT
    row_lo = tl.minimum(tl.maximum(row_lo, 0), N_Q)
    row_hi = tl.where(start_n < kv_len, tl.minimum(tl.maximum(row_hi, row_lo), N_Q), row_lo)
    full_lo = tl.minimum(tl.maximum(full_lo, row_lo), row_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), row_hi)
    full_lo = row_lo + tl.cdiv(full_lo - row_lo, BLOCK_M) * BLOCK_M
    full_hi = full_lo + tl.maximum(full_hi - full_lo, 0) // BLOCK_M * BLOCK_M
    return row_lo, full_lo, full_hi, row_hi


@triton.jit
def _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base, delta_base, keys, start,
                   stop,
                   N_Q, SHIFT, kv_len, doc_start, doc_end, qk_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Accumulate dK, dV of one key block over query rows [start, stop), in transposed (key-major) form."""
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, N_Q, stride_qn, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, rows, N_Q, stride_don, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_base + rows, mask=rows < N_Q, other=float("inf"))  # padding rows get P = 0
        delta = tl.load(delta_base + rows, mask=rows < N_Q, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASKED:
            lo, hi = _row_key_bounds(rows, N_Q, SHIFT, kv_len, doc_start, doc_end, CAUSAL, HAS_DOCS)
            visible_t = keys[:, None] < hi[None, :]
            if HAS_DOCS:
                visible_t = visible_t & (keys[:, None] >= lo[None, :])
            p_t = tl.where(visible_t, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)  # dV = P^T dO
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - Delta)
        dk += tl.dot(ds_t.to(q.dtype), q)  # dK = dS^T Q (times scale, applied once at the end)
    return dk, dv


def _bwd_dkdv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    # dK, dV, K, V all stay in registers: the tutorial's (32, 128, 4 warps) spills ~1.4 KB per thread at
    # D = 128 on sm_90, these 8-warp tiles at most 16 B (64 x 128 is for D = 64); (32, 64, 4, 2) fits fp32
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 2)]]


@triton.autotune(configs=_bwd_dkdv_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, KeyLen, DocStart, DocEnd, KeyMask, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                   stride_vn,
                   stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn, N_Q, N_KV, H_KV, GROUP, SHIFT, N_Q_BUCKET, N_KV_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_LENGTHS: tl.constexpr,
                   HAS_DOCS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_N keys of one (batch, kv head); it loops over all GROUP query heads
    that read this kv head, so no two programs write the same dK / dV rows (no atomics)."""
    bh_kv, start_n = _program_tile(N_KV, BLOCK_N)
    b, h_kv = bh_kv // H_KV, bh_kv % H_KV
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh, keys, N_KV, stride_kn,
                   HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D), resident
    v = _load_rows(V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh, keys, N_KV, stride_vn,
                   HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    per_key = b.to(tl.int64) * N_KV
    doc_start, doc_end = DocStart + per_key, DocEnd + per_key
    row_lo, full_lo, full_hi, row_hi = _query_loop_bounds(start_n, kv_len, N_Q, N_KV, SHIFT, doc_start,
                                                          doc_end,
                                                          CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = (h_kv * GROUP + g).to(tl.int64)  # a query head with h // GROUP == h_kv
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        row_offset = (b.to(tl.int64) * H_KV * GROUP + h) * N_Q  # this head's rows of LSE and Delta
        for part in tl.static_range(3):
            lo_m, hi_m = _segment(part, row_lo, full_lo, full_hi, row_hi)
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, LSE + row_offset,
                                    Delta + row_offset, keys, lo_m, hi_m, N_Q, SHIFT, kv_len, doc_start,
                                    doc_end,
                                    qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, part != 1, CAUSAL, HAS_DOCS)
    # hidden keys (past kv_len or key_mask) took part in no softmax: their rows are zero, whatever the loop
    # computed for them
    is_seen = keys < kv_len
    if HAS_KEY_MASK:
        is_seen = is_seen & _key_shown(KeyMask + per_key, keys, N_KV)
    _store_rows(DK + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh, keys, N_KV, stride_dkn,
                tl.where(is_seen[:, None], dk * sm_scale, 0.0), HEAD_DIM, BLOCK_D)
    _store_rows(DV + b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh, keys, N_KV, stride_dvn,
                tl.where(is_seen[:, None], dv, 0.0), HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, key_mask, lo, hi, start, stop,
                 N_KV,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, stop)."""
    for start_n in range(start, stop, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, keys, N_KV, stride_kn, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, keys, N_KV, stride_vn, HEAD_DIM, BLOCK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED or HAS_KEY_MASK:
            p = tl.where(_visible(keys, lo, hi, key_mask, N_KV, MASKED, HAS_DOCS, HAS_KEY_MASK), p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # dQ = dS K (times scale, applied once at the end)
    return dq


def _bwd_dq_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)  # spill-free on sm_90
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]]


@triton.autotune(configs=_bwd_dq_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, KeyLen, DocStart, DocEnd, KeyMask, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                 stride_vn,
                 stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                 N_Q, N_KV, H_Q, GROUP, SHIFT, N_Q_BUCKET, N_KV_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_LENGTHS: tl.constexpr,
                 HAS_DOCS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one (batch, query head), the forward's key walk."""
    bh, start_m = _program_tile(N_Q, BLOCK_M)
    b, h = (bh // H_Q).to(tl.int64), (bh % H_Q).to(tl.int64)
    h_kv = h // GROUP
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    per_key = b * N_KV
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, N_Q, stride_qn, HEAD_DIM, BLOCK_D)  # (BM, BD)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, N_Q, stride_don, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_len = _valid_key_count(KeyLen, b, N_KV, HAS_LENGTHS)
    lo, hi = _row_key_bounds(rows, N_Q, SHIFT, kv_len, DocStart + per_key, DocEnd + per_key, CAUSAL, HAS_DOCS)
    start, full_lo, full_hi, end = _key_loop_bounds(lo, hi, rows, N_Q, N_KV, BLOCK_N)
    for part in tl.static_range(3):
        lo_n, hi_n = _segment(part, start, full_lo, full_hi, end)
        dq = _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, KeyMask + per_key,
                          lo, hi,
                          lo_n, hi_n, N_KV, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, part != 1, HAS_DOCS,
                          HAS_KEY_MASK)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, rows, N_Q, stride_dqn, dq * sm_scale, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers and autograd

def _bhn(t):
    """(batch, head, row) strides of a (B, H, N, D) tensor whose head dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _head_dim_contiguous(t):
    """The kernels read rows of D contiguous elements; any (B, H, N) strides are fine (views, expand())."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _kernel_masks(key_lengths, key_mask, doc_ids, device, placeholder):
    """The mask tensors the kernels read (placeholder for an absent one: never read) and their flags."""
    tensors, flags = [placeholder] * 4, dict(HAS_LENGTHS=False, HAS_DOCS=False, HAS_KEY_MASK=False)
    if key_lengths is not None:
        tensors[0], flags["HAS_LENGTHS"] = key_lengths.to(device=device, dtype=torch.int32).contiguous(), True
    if doc_ids is not None:
        start, end = document_bounds(doc_ids.to(device))
        tensors[1:3], flags["HAS_DOCS"] = [start.int().contiguous(), end.int().contiguous()], True
    if key_mask is not None:
        tensors[3], flags["HAS_KEY_MASK"] = key_mask.to(device=device, dtype=torch.int8).contiguous(), True
    return tensors, flags


class FlashAttention(torch.autograd.Function):
    """Triton forward / backward. Inputs already checked by `attention`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_lengths, key_mask, doc_ids):
        q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
        batch, h_q, n_q, head_dim = q.shape
        h_kv, n_kv = k.shape[1], k.shape[2]
        o = torch.empty_like(q)  # in q's memory layout: a (B, N, H, D) view gets one back, no copy later
        lse = torch.empty((batch, h_q, n_q), device=q.device, dtype=torch.float32)
        masks, flags = _kernel_masks(key_lengths, key_mask, doc_ids, q.device, lse)
        meta = dict(N_Q=n_q, N_KV=n_kv, GROUP=h_q // h_kv, SHIFT=n_kv - n_q, N_Q_BUCKET=length_bucket(n_q),
                    N_KV_BUCKET=length_bucket(n_kv), HEAD_DIM=head_dim,
                    BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal, **flags)
        grid = lambda config: (triton.cdiv(n_q, config["BLOCK_M"]) * batch * h_q,)
        _attn_fwd[grid](q, k, v, o, lse, *masks, scale * LOG2_E, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(o),
                        H_Q=h_q, **meta)
        ctx.save_for_backward(q, k, v, o, lse, *masks)
        ctx.scale, ctx.meta = scale, meta
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, *masks = ctx.saved_tensors
        do = _head_dim_contiguous(do)
        batch, h_q, n_q, _ = q.shape
        h_kv, n_kv = k.shape[1], k.shape[2]
        meta = ctx.meta
        delta = torch.empty_like(lse)
        preprocess_rows = 16 if INTERPRET else 128
        _attn_bwd_preprocess[(triton.cdiv(n_q, preprocess_rows) * batch * h_q,)](
            o, do, delta, *_bhn(o), *_bhn(do), n_q, h_q, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"],
            BLOCK_M=preprocess_rows)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qk_scale = ctx.scale * LOG2_E
        grid_kv = lambda config: (triton.cdiv(n_kv, config["BLOCK_N"]) * batch * h_kv,)
        _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, *masks, qk_scale, ctx.scale, *_bhn(q),
                                *_bhn(k),
                                *_bhn(v), *_bhn(do), *_bhn(dk), *_bhn(dv), H_KV=h_kv, **meta)
        grid_q = lambda config: (triton.cdiv(n_q, config["BLOCK_M"]) * batch * h_q,)
        _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, *masks, qk_scale, ctx.scale, *_bhn(q), *_bhn(k),
                             *_bhn(v),
                             *_bhn(do), *_bhn(dq), H_Q=h_q, **meta)
        return dq, dk, dv, None, None, None, None, None


def _triton_attention(q, k, v, causal, scale, key_lengths, key_mask=None, doc_ids=None):
    check_triton_can_run("attention", q)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: the Triton kernels take head dims up to {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")
    for name, t in (("q", q), ("k", k), ("v", v)):  # row offsets inside one (batch, head) are int32
        if t.shape[2] * abs(t.stride(2)) >= 2**31:
            raise ValueError(f"attention: {name} {tuple(t.shape)} with row stride {t.stride(2)} spans 2^31 "
                             "elements within one head, past the kernels' int32 row offsets")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, causal, scale, key_lengths, key_mask, doc_ids)


# ----------------------------------------------------------------------------- entry point

def attention(q, k, v, causal=False, scale=None, key_lengths=None, key_mask=None, doc_ids=None):
    """softmax(scale * Q K^T + mask) V. q (B, Hq, Nq, D), k / v (B, Hkv, Nkv, D) -> (B, Hq, Nq, D).
    See the module docstring for GQA, the causal offset, key_lengths, key_mask, doc_ids and KERNELS."""
    if torch.is_autocast_enabled(q.device.type):  # like SDPA under autocast: run in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v, causal, key_lengths, key_mask, doc_ids)
    if use_triton("attention", q, kernels_fit=q.shape[-1] <= MAX_HEAD_DIM):
        return _triton_attention(q, k, v, causal, scale, key_lengths, key_mask, doc_ids)
    return _sdpa_attention(q, k, v, causal, scale, key_lengths, key_mask, doc_ids)
