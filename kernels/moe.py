"""Mixture-of-Experts FFN: top-k router, dropless dispatch, grouped GEMM (Triton) and a PyTorch reference.

    y, aux = moe_ffn(x, router_weight, w1, w3, w2, top_k)
        x (T, C), router_weight (E, C), w1 / w3 (E, F, C), w2 (E, C, F)  (nn.Linear layout, stacked)
        y (T, C); aux = dict(balance_loss=scalar, z_loss=scalar, counts=LongTensor (E,))

Each expert is a SwiGLU FFN, y_e(x) = w2_e (silu(w1_e x) * w3_e x), as in a Llama-style decoder, and
y = sum_j gate_j * y_{e_j}(x) over the token's top-k experts (MM1's MoE: top-2 of 64 experts).

The Triton path (vLLM fused_moe / ScatterMoE style) never drops a token, never copies x and never
synchronises with the host (counts by scatter_add_, not bincount, which reads min / max back on CUDA):
  1. plan_dispatch: stable-sort the T*k (token, slot) pairs by expert and pad each expert's segment to
     a multiple of BLOCK_M, so every BLOCK_M block of the sorted order belongs to a single expert.
  2. grouped_matmul_kernel: one program per (block, N tile) multiplies its rows by that expert's weight,
     gathering the token rows of x on load; results are written in the sorted order. The up projection
     is one gathered GEMM for w1 and w3 together (GATED: each x tile loaded once feeds both products),
     whose epilogue also writes silu(h1) * h3; then the same GEMM with w2.
  3. combine_kernel: y[t] = sum_j gate[t, j] * out[position of (t, j)]; one program owns each output
     row, so the sum over k needs no atomics and is deterministic.
  Backward: swiglu_backward_kernel (it stops at the end of the last expert's segment: the padded tail
  past it is never written nor read), dX with the same grouped GEMM against w^T (dh1 w1 + dh3 w3 in
  one launch, then the combine over k), dW with a grouped X^T dY per expert (grouped_weight_grad_kernel,
  one launch for w1 and w3), d(gates) from the combine; torch.autograd glues them.
Offsets into the weights and the sorted rows are int64 (E * F * C passes 2^31 at MoE-LLM sizes). GEMM
tiles are autotuned per (N, K, power-of-two bucket of the row count) (kernels/_common.py).
Dispatch: Triton on CUDA tensors of fp16 / bf16 / fp32, the per-expert loop elsewhere (fp64 on CUDA
included); KERNELS=triton / KERNELS=ref forces one (the tests run the Triton kernels on CPU through
TRITON_INTERPRET=1, set before triton is imported; bf16 there is an error).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import _common
from kernels._common import HAS_TRITON, INTERPRET, tile_mask, tl, triton  # noqa: F401  (HAS_TRITON: for the tests)

BLOCK_M = 16 if INTERPRET else 64  # rows per GEMM block = the padding unit of every expert's segment
ELEMENTWISE_BLOCK = 1024  # elements per program of the SwiGLU backward


def gemm_configs():
    """Tile candidates, autotuned per (N, K, row bucket) on the GPU; one small tile in the interpreter."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_N=32, BLOCK_K=32), num_warps=1, num_stages=1)]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s) for n, k, w, s in
            [(128, 64, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3)]]


# ----------------------------------------------------------------------------------------------
# Router (plain PyTorch on every path: it is a (T, C) x (C, E) product, tiny next to the experts)

def route(logits, top_k):
    """Top-k routing with renormalised gates, plus the two auxiliary losses.

    logits (T, E) -> gates (T, k) fp32, expert_idx (T, k) int64, aux dict:
      balance_loss = E * sum_i f_i * P_i   (Switch Transformer eq. 4 / GShard), where f_i is the
                     fraction of the T*k (token, slot) assignments that go to expert i and P_i the
                     mean router probability of expert i. It is 1.0 for a perfectly uniform router.
      z_loss       = mean_t logsumexp(logits_t)^2   (ST-MoE eq. 5, router z-loss)
      counts       = tokens routed to each expert (E,), for logging.
    With top_k = 1 the renormalised gate is exactly 1, so the router then learns only from the losses.
    """
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    logits = logits.float()
    probs = logits.softmax(dim=-1)  # (T, E)
    top_probs, expert_idx = probs.topk(top_k, dim=-1)  # (T, k)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True)  # (T, k), renormalised over the k chosen
    counts = expert_counts(expert_idx, num_experts)  # (E,)
    dispatch_fraction = counts.float() / (num_tokens * top_k)  # f_i: no gradient (argmax)
    balance_loss = num_experts * (dispatch_fraction * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return gates, expert_idx, dict(balance_loss=balance_loss, z_loss=z_loss, counts=counts)


def expert_counts(expert_idx, num_experts):
    """(T, k) expert ids -> (E,) int64 counts. scatter_add_, not bincount: no host sync on CUDA."""
    flat = expert_idx.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def router_logits(x, router_weight):
    """(T, C) x (E, C) -> (T, E) in fp32, outside autocast: softmax / logsumexp need the precision."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), router_weight.float())


def check_shapes(x, router_weight, w1, w3, w2, top_k):
    """Raise a ValueError naming the first argument whose shape does not fit the others."""
    if x.dim() != 2:
        raise ValueError(f"moe_ffn: x must be (T, C), got {tuple(x.shape)}")
    d_model, num_experts = x.shape[1], router_weight.shape[0]
    d_ff = w1.shape[1] if w1.dim() == 3 else -1
    expected = dict(router_weight=(num_experts, d_model), w1=(num_experts, d_ff, d_model),
                    w3=(num_experts, d_ff, d_model), w2=(num_experts, d_model, d_ff))
    for name, tensor in dict(router_weight=router_weight, w1=w1, w3=w3, w2=w2).items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"moe_ffn: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                             f"(E={num_experts}, F={d_ff}, C={d_model})")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe_ffn: top_k={top_k} must be in [1, num_experts={num_experts}]")


# ----------------------------------------------------------------------------------------------
# Reference: a Python loop over experts, one dense SwiGLU per expert on the tokens it received

def swiglu(x, w1, w3, w2):
    """Llama FFN: (n, C) -> (n, C) with w1 / w3 (F, C) and w2 (C, F)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def moe_ffn_reference(x, router_weight, w1, w3, w2, top_k):
    """Plain-PyTorch MoE FFN (same contract as moe_ffn): the oracle of the tests and the CPU path."""
    check_shapes(x, router_weight, w1, w3, w2, top_k)
    gates, expert_idx, aux = route(router_logits(x, router_weight), top_k)
    y = torch.zeros_like(x)
    for expert in range(router_weight.shape[0]):
        token, slot = torch.where(expert_idx == expert)  # the (token, slot) pairs this expert serves
        if token.numel() == 0:
            continue
        expert_out = swiglu(x[token], w1[expert], w3[expert], w2[expert])  # (n, C)
        y = y.index_add(0, token, (expert_out * gates[token, slot, None]).to(y.dtype))
    return y, aux


# ----------------------------------------------------------------------------------------------
# Dispatch plan: sort (token, slot) pairs by expert, pad each expert's segment to BLOCK_M

@dataclass
class DispatchPlan:
    """Where every (token, slot) pair p = token * top_k + slot goes in the expert-sorted order.

    sorted_pair     (R,)   pair id at each sorted row; padding rows hold the sentinel num_pairs
    block_expert    (R/BLOCK_M,) expert of each BLOCK_M block; num_experts for blocks past the end
    segment_offsets (E+1,) padded segment of expert e = rows [segment_offsets[e], segment_offsets[e+1])
    pair_position   (T, k) sorted row of each pair (the inverse of sorted_pair)
    R = num_pairs + E * (BLOCK_M - 1), rounded up to BLOCK_M, bounds the padded length without reading
    the counts back to the host. Rows past segment_offsets[E] are never written nor read.
    """
    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    segment_offsets: torch.Tensor
    pair_position: torch.Tensor
    num_experts: int
    top_k: int
    block_m: int

    @property
    def num_pairs(self):
        return self.pair_position.numel()


def plan_dispatch(expert_idx, num_experts, block_m):
    """(T, k) expert ids -> DispatchPlan. Plain torch ops on the device, no host synchronisation."""
    num_tokens, top_k = expert_idx.shape
    num_pairs, device = num_tokens * top_k, expert_idx.device
    flat_expert = expert_idx.flatten()  # (T*k,) expert of pair p
    order = torch.argsort(flat_expert, stable=True)  # pairs grouped by expert, token order kept inside
    counts = expert_counts(flat_expert, num_experts)  # (E,)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    segment_offsets = F.pad(padded_counts.cumsum(0), (1, 0))  # (E+1,)
    unpadded_offsets = F.pad(counts.cumsum(0), (1, 0))  # where each expert starts in `order`
    sorted_expert = flat_expert[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - unpadded_offsets[sorted_expert]
    position = segment_offsets[sorted_expert] + rank_in_expert  # (T*k,) padded row of order[i]

    num_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pair = torch.full((num_rows,), num_pairs, dtype=torch.int64, device=device)
    sorted_pair[position] = order
    pair_position = torch.empty(num_pairs, dtype=torch.int64, device=device)
    pair_position[order] = position
    block_start = torch.arange(0, num_rows, block_m, device=device)
    block_expert = torch.searchsorted(segment_offsets[1:], block_start, right=True)  # empty experts skipped
    return DispatchPlan(sorted_pair, block_expert, segment_offsets, pair_position.view(num_tokens, top_k),
                        num_experts, top_k, block_m)


# ----------------------------------------------------------------------------------------------
# Triton kernels

def _prune_gemm(configs, named_args, **kwargs):
    return _common.prune_configs(configs, {**named_args, **kwargs}["ROWS_BUCKET"])


def gemm_tuning(*flags):
    """Autotune arguments of a grouped GEMM kernel: tuned per (N, K, row-count bucket, flags)."""
    return dict(configs=gemm_configs(), key=["N", "K", "ROWS_BUCKET", *flags],
                prune_configs_by={"early_config_prune": _prune_gemm})


@triton.jit
def _gathered_rows(sorted_pair_ptr, offs_m, num_pairs, TOP_K: tl.constexpr, GATHER: tl.constexpr):
    """For sorted rows offs_m: which ones hold a real (token, slot) pair, and the row of `a` each reads:
    the pair's token when GATHER (rows of x gathered on load), else the sorted row itself."""
    pair = tl.load(sorted_pair_ptr + offs_m)
    if GATHER:
        return pair < num_pairs, pair // TOP_K
    return pair < num_pairs, offs_m


@triton.autotune(**gemm_tuning("GATED", "SUM_W3"))
@triton.jit
def grouped_matmul_kernel(
    a_ptr, w_ptr, w3_ptr, out_ptr, act_ptr, sorted_pair_ptr, block_expert_ptr,
    N, K, num_pairs, num_experts, ROWS_BUCKET,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, stride_actm,
    TOP_K: tl.constexpr, GATHER: tl.constexpr, GATED: tl.constexpr, SUM_W3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[p, :] = a[row(p), :] @ w[e].T for the BLOCK_M sorted rows p of this program, all of expert e.

    row(p) = token of pair p if GATHER (no permuted copy of x is ever written), else p. Padding rows load
    zeros and store zeros. w3 has the same strides as w and is used in one of two ways:
    GATED (up projection): w3 is multiplied by the same a tiles; out[p] = [h1 | h3] (2N columns, kept for
      the backward) and act[p] = silu(h1) * h3 (N columns).
    SUM_W3 (its backward, dX = dh1 w1 + dh3 w3): a[p] = [dh1 | dh3] (2K columns), both products summed.
    """
    num_n_tiles = tl.cdiv(N, BLOCK_N)  # N tiles vary fastest: they reuse this block's gathered rows from L2,
    pid_m = tl.program_id(0) // num_n_tiles  # and an expert's blocks run close together, sharing its w tiles
    pid_n = tl.program_id(0) % num_n_tiles
    expert = tl.load(block_expert_ptr + pid_m)  # int64
    if expert >= num_experts:  # block past the last expert's segment
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    is_real, a_row = _gathered_rows(sorted_pair_ptr, offs_m, num_pairs, TOP_K, GATHER)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    w_offsets = expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=is_real[:, None] & (offs_k[None, :] < K - k), other=0.0)
        w_mask = tile_mask(offs_k, K - k, offs_n, N, True)
        acc = tl.dot(a, tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0), acc)  # fp32 accumulation
        if GATED:
            acc3 = tl.dot(a, tl.load(w3_ptr + w_offsets, mask=w_mask, other=0.0), acc3)
        if SUM_W3:
            a3 = tl.load(a_ptrs + K * stride_ak, mask=is_real[:, None] & (offs_k[None, :] < K - k), other=0.0)
            acc = tl.dot(a3, tl.load(w3_ptr + w_offsets, mask=w_mask, other=0.0), acc)
        a_ptrs += BLOCK_K * stride_ak
        w_offsets += BLOCK_K * stride_wk
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    n_ok = offs_n[None, :] < N
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    if GATED:
        h1 = acc.to(out_ptr.dtype.element_ty)  # the rounded values the backward will read
        h3 = acc3.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs + N * stride_on, h3, mask=n_ok)
        h1, h3 = h1.to(tl.float32), h3.to(tl.float32)
        act = h1 * tl.sigmoid(h1) * h3
        tl.store(act_ptr + offs_m[:, None] * stride_actm + offs_n[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.autotune(**gemm_tuning())
@triton.jit
def grouped_weight_grad_kernel(
    grad_out_ptr, a_ptr, grad_w_ptr, sorted_pair_ptr, segment_offsets_ptr,
    N, K, num_pairs, ROWS_BUCKET,
    stride_gm, stride_gn, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
    TOP_K: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_w[e] (N, K) = sum over the sorted rows p of expert e of grad_out[p, :]^T a[row(p), :].

    One program per (expert, N tile, K tile) walks that expert's whole segment: every grad_w tile has
    a single owner and a fixed summation order (no atomics, bitwise reproducible). An expert that got
    no token walks nothing and stores zeros. 1-D grid (no 65535 limit on y / z).
    """
    num_n_tiles, num_k_tiles = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    expert = (tl.program_id(0) // (num_n_tiles * num_k_tiles)).to(tl.int64)
    pid_n = tl.program_id(0) // num_k_tiles % num_n_tiles
    pid_k = tl.program_id(0) % num_k_tiles
    segment_start = tl.load(segment_offsets_ptr + expert)
    segment_end = tl.load(segment_offsets_ptr + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m in range(segment_start, segment_end, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        is_real, a_row = _gathered_rows(sorted_pair_ptr, offs_m, num_pairs, TOP_K, GATHER)
        grad = tl.load(grad_out_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                       mask=is_real[:, None] & (offs_n[None, :] < N), other=0.0)  # (BM, BN)
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=is_real[:, None] & (offs_k[None, :] < K), other=0.0)  # (BM, BK)
        acc = tl.dot(tl.trans(grad), a, acc)
    grad_w_ptrs = grad_w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    tl.store(grad_w_ptrs, acc.to(grad_w_ptr.dtype.element_ty), mask=tile_mask(offs_n, N, offs_k, K, True))


@triton.jit
def combine_kernel(
    rows_ptr, pair_position_ptr, weight_ptr, out_ptr, N, stride_r, stride_o,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum_j weight[t, j] * rows[pair_position[t, j]]: token t's k sorted rows, fixed order."""
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        position = tl.load(pair_position_ptr + token * TOP_K + j)
        weight = tl.load(weight_ptr + token * TOP_K + j).to(tl.float32)
        acc += weight * tl.load(rows_ptr + position * stride_r + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def combine_backward_kernel(
    grad_out_ptr, rows_ptr, pair_position_ptr, weight_ptr, grad_rows_ptr, grad_weight_ptr,
    N, stride_g, stride_r,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For each slot j of token t: grad_rows[pair_position[t, j]] = weight[t, j] * grad_out[t] and
    grad_weight[t, j] = <grad_out[t], rows[pair_position[t, j]]> (the gradient into the router's gates).
    Every sorted row belongs to one pair, so the scatter has one writer per row: no atomics."""
    token = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOP_K):
        position = tl.load(pair_position_ptr + token * TOP_K + j)
        weight = tl.load(weight_ptr + token * TOP_K + j).to(tl.float32)
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n in range(0, N, BLOCK_N):
            offs_n = n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            grad = tl.load(grad_out_ptr + token * stride_g + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            row = tl.load(rows_ptr + position * stride_r + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            dot += grad * row
            tl.store(grad_rows_ptr + position * stride_r + offs_n,
                     (weight * grad).to(grad_rows_ptr.dtype.element_ty), mask=n_ok)
        tl.store(grad_weight_ptr + token * TOP_K + j, tl.sum(dot, axis=0))


@triton.jit
def swiglu_backward_kernel(grad_ptr, h13_ptr, grad_h13_ptr, segment_offsets_ptr, num_experts, F_DIM,
                           BLOCK: tl.constexpr):
    """d(silu(h1) h3) over the (R, F) sorted rows, h13 / grad_h13 = [h1 | h3] rows of 2F:
    grad_h3 = grad silu(h1), grad_h1 = grad h3 sigmoid(h1) (1 + h1 (1 - sigmoid(h1))).
    Elements past the last expert's segment (the padded tail nothing wrote) are skipped."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    num_elements = tl.load(segment_offsets_ptr + num_experts) * F_DIM  # read on the device: no host sync
    if tl.program_id(0).to(tl.int64) * BLOCK >= num_elements:
        return
    ok = offs < num_elements
    row, col = offs // F_DIM, offs % F_DIM
    h1_offs = row * 2 * F_DIM + col
    grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h1 = tl.load(h13_ptr + h1_offs, mask=ok, other=0.0).to(tl.float32)
    h3 = tl.load(h13_ptr + h1_offs + F_DIM, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(h1)
    out_ty = grad_h13_ptr.dtype.element_ty
    tl.store(grad_h13_ptr + h1_offs + F_DIM, (grad * h1 * sig).to(out_ty), mask=ok)
    tl.store(grad_h13_ptr + h1_offs, (grad * h3 * sig * (1 + h1 * (1 - sig))).to(out_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers and autograd

def grouped_matmul(a, w, plan, gather, w3=None, sum_w3=False):
    """(rows, K) x (E, N, K) -> (R, N) in the sorted order: out[p] = a[row(p)] @ w[expert(p)].T.
    With w3: the gated up projection, returning h13 (R, 2N) = [h1 | h3] and act (R, N) = silu(h1) * h3;
    with w3 and sum_w3: a is (rows, 2K) = [a1 | a3] and out[p] = a1 @ w[e].T + a3 @ w3[e].T."""
    num_experts, n, k = w.shape
    gated = w3 is not None and not sum_w3
    if w3 is not None and w3.stride() != w.stride():  # the kernel walks both with one set of strides
        w, w3 = w.contiguous(), w3.contiguous()
    out = a.new_empty(plan.sorted_pair.numel(), 2 * n if gated else n)
    act = a.new_empty(plan.sorted_pair.numel(), n) if gated else out
    grid = lambda meta: (plan.block_expert.numel() * triton.cdiv(n, meta["BLOCK_N"]),)
    grouped_matmul_kernel[grid](
        a, w, w if w3 is None else w3, out, act, plan.sorted_pair, plan.block_expert, n, k, plan.num_pairs,
        num_experts, _common.length_bucket(plan.num_pairs), *a.stride(), *w.stride(), *out.stride(),
        act.stride(0), TOP_K=plan.top_k, GATHER=gather, GATED=gated, SUM_W3=sum_w3, BLOCK_M=plan.block_m)
    return (out, act) if gated else out


def grouped_weight_grad(grad_out, a, plan, gather):
    """(R, N) sorted grads x (rows, K) inputs -> (E, N, K): each expert's X^T dY over its own rows."""
    n, k = grad_out.shape[1], a.shape[1]
    grad_w = grad_out.new_empty(plan.num_experts, n, k)
    tiles = lambda meta: triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])
    grid = lambda meta: (plan.num_experts * tiles(meta),)
    grouped_weight_grad_kernel[grid](
        grad_out, a, grad_w, plan.sorted_pair, plan.segment_offsets, n, k, plan.num_pairs,
        _common.length_bucket(plan.num_pairs), *grad_out.stride(), *a.stride(), *grad_w.stride(),
        TOP_K=plan.top_k, GATHER=gather, BLOCK_M=plan.block_m)
    return grad_w


def combine_block_n(n):
    return min(triton.next_power_of_2(n), 32 if INTERPRET else 1024)


def combine(rows, weight, plan):
    """(R, N) sorted rows, (T, k) weights -> (T, N): sum over each token's k rows."""
    num_tokens, n = weight.shape[0], rows.shape[1]
    out = rows.new_empty(num_tokens, n)
    block_n = combine_block_n(n)
    combine_kernel[(num_tokens, triton.cdiv(n, block_n))](
        rows, plan.pair_position, weight, out, n, rows.stride(0), out.stride(0),
        TOP_K=plan.top_k, BLOCK_N=block_n)
    return out


def input_grad(grad_sorted, plan, gather):
    """dA from the (R, K) sorted-order gradient: a gathered token's k rows each carry part of it (summed by
    the combine kernel, no atomics); an ungathered input already is in the sorted order."""
    if not gather:
        return grad_sorted
    ones = torch.ones(plan.pair_position.shape, device=grad_sorted.device, dtype=torch.float32)
    return combine(grad_sorted, ones, plan)


class GroupedMatmul(torch.autograd.Function):
    """out (R, N) = a[row(p)] @ w[expert(p)].T in the sorted order, with dA and dW (every expert)."""

    @staticmethod
    def forward(ctx, a, w, plan, gather):
        ctx.save_for_backward(a, w)
        ctx.plan, ctx.gather = plan, gather
        return grouped_matmul(a, w, plan, gather)

    @staticmethod
    def backward(ctx, grad_out):
        a, w = ctx.saved_tensors
        plan, gather = ctx.plan, ctx.gather
        grad_out = grad_out.contiguous()
        grad_a = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_a = input_grad(grouped_matmul(grad_out, w.transpose(1, 2), plan, gather=False), plan, gather)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_weight_grad(grad_out, a, plan, gather)
        return grad_a, grad_w, None, None


class GatedUpProjection(torch.autograd.Function):
    """act (R, F) = silu(x[token(p)] @ w1[e].T) * (x[token(p)] @ w3[e].T): one gathered GEMM for both."""

    @staticmethod
    def forward(ctx, x, w1, w3, plan):
        h13, act = grouped_matmul(x, w1, plan, gather=True, w3=w3)  # (R, 2F), (R, F)
        ctx.save_for_backward(x, w1, w3, h13)
        ctx.plan = plan
        return act

    @staticmethod
    def backward(ctx, grad_act):
        x, w1, w3, h13 = ctx.saved_tensors
        plan, d_ff = ctx.plan, w1.shape[1]
        grad_act = grad_act.contiguous()
        grad_h13 = torch.empty_like(h13)  # (R, 2F); the tail past the last segment stays unwritten
        swiglu_backward_kernel[(triton.cdiv(grad_act.numel(), ELEMENTWISE_BLOCK),)](
            grad_act, h13, grad_h13, plan.segment_offsets, plan.num_experts, d_ff, BLOCK=ELEMENTWISE_BLOCK)
        # dX = dh1 w1 + dh3 w3 in one grouped GEMM over the [dh1 | dh3] rows
        grad_sorted = grouped_matmul(grad_h13, w1.transpose(1, 2), plan, gather=False, w3=w3.transpose(1, 2),
                                     sum_w3=True)  # (R, C)
        grad_w13 = grouped_weight_grad(grad_h13, x, plan, gather=True)  # (E, 2F, C): w1 and w3 at once
        return input_grad(grad_sorted, plan, gather=True), grad_w13[:, :d_ff], grad_w13[:, d_ff:], None


class Combine(torch.autograd.Function):
    """y (T, N) = sum_j gates[t, j] * rows[pair_position[t, j]], with d(rows) and d(gates)."""

    @staticmethod
    def forward(ctx, rows, gates, plan):
        ctx.save_for_backward(rows, gates)
        ctx.plan = plan
        return combine(rows, gates, plan)

    @staticmethod
    def backward(ctx, grad_out):
        rows, gates = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_rows = torch.empty_like(rows)  # padding rows stay unwritten: every kernel masks them
        grad_gates = torch.empty(gates.shape, device=gates.device, dtype=torch.float32)
        n = rows.shape[1]
        combine_backward_kernel[(gates.shape[0],)](
            grad_out, rows, plan.pair_position, gates, grad_rows, grad_gates, n,
            grad_out.stride(0), rows.stride(0), TOP_K=plan.top_k, BLOCK_N=combine_block_n(n))
        return grad_rows, grad_gates.to(gates.dtype), None


def moe_ffn_triton(x, router_weight, w1, w3, w2, top_k):
    """MoE SwiGLU FFN through the Triton kernels (same contract as moe_ffn)."""
    check_shapes(x, router_weight, w1, w3, w2, top_k)
    if torch.is_autocast_enabled(x.device.type):  # the kernels need one dtype: cast like autocast would
        dtype = torch.get_autocast_dtype(x.device.type)
        x_in, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    else:
        x_in = x
    dtypes = (x_in.dtype, w1.dtype, w3.dtype, w2.dtype)
    if len(set(dtypes)) != 1:
        raise ValueError(f"moe_ffn: the Triton path needs x, w1, w3, w2 in one dtype, got {dtypes}")
    _common.check_triton_can_run("moe_ffn", x_in)
    gates, expert_idx, aux = route(router_logits(x, router_weight), top_k)
    plan = plan_dispatch(expert_idx, router_weight.shape[0], BLOCK_M)
    act = GatedUpProjection.apply(x_in, w1, w3, plan)  # (R, F) sorted rows, x gathered on load
    expert_out = GroupedMatmul.apply(act, w2, plan, False)  # (R, C)
    return Combine.apply(expert_out, gates, plan), aux  # (T, C)


# ----------------------------------------------------------------------------------------------
# Entry point

def moe_ffn(x, router_weight, w1, w3, w2, top_k):
    """MoE SwiGLU FFN. Triton on CUDA tensors of a kernel dtype, the reference elsewhere; KERNELS=triton|ref
    forces one (kernels/_common.py).

    x (T, C), router_weight (E, C), w1 / w3 (E, F, C), w2 (E, C, F) -> y (T, C), aux dict with
    balance_loss, z_loss (scalars, to be weighted by the caller, e.g. 0.01 and 0.001) and counts (E,).
    """
    if _common.use_triton("moe_ffn", x):
        return moe_ffn_triton(x, router_weight, w1, w3, w2, top_k)
    return moe_ffn_reference(x, router_weight, w1, w3, w2, top_k)
