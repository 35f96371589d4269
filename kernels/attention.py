"""Fused attention: softmax(scale * Q K^T + mask) V, with a plain-PyTorch oracle beside it.

    from kernels import attention
    out = attention(q, k, v, causal=True)      # q (B, Hq, N, D), k / v (B, Hkv, N, D) -> (B, Hq, N, D)

Semantics (identical on every path):
- GQA / MQA: Hq must be a multiple of Hkv; query head h reads key/value head h // (Hq // Hkv).
- causal=True: query i sees keys j <= i (needs as many queries as keys).
- key_lengths: optional integer tensor (B,) of valid key counts for right-padded batches; keys
  j >= key_lengths[b] are invisible. A query row that sees no key at all (key_lengths[b] == 0)
  outputs 0 and gets zero gradients instead of NaN.
- scale: softmax temperature, default 1 / sqrt(D).

Paths: the Triton kernels (work in progress) on CUDA tensors; `F.scaled_dot_product_attention`
elsewhere. The environment variable KERNELS=triton or KERNELS=ref forces one of them.
`attention_reference` is the fp32 oracle the tests compare against.
"""
import math
import os

import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------- entry point

def attention(q, k, v, causal=False, scale=None, key_lengths=None):
    """softmax(scale * Q K^T + mask) V. q (B, Hq, Nq, D), k / v (B, Hkv, Nkv, D) -> (B, Hq, Nq, D).
    See the module docstring for GQA, causal, key_lengths and the KERNELS override."""
    _check_inputs(q, k, v, causal, key_lengths)
    forced = os.environ.get("KERNELS", "")
    if forced and forced not in KERNEL_PATHS:
        raise ValueError(f"KERNELS={forced!r}: expected one of {', '.join(KERNEL_PATHS)} (or unset)")
    if forced == "triton":
        raise NotImplementedError("attention: the Triton path is being written (issue 3); unset KERNELS")
    return _sdpa_attention(q, k, v, causal, scale, key_lengths)
