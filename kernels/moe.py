"""Mixture-of-Experts FFN: top-k router, dropless dispatch, grouped GEMM (Triton) and a PyTorch reference.

    y, aux = moe_ffn(x, router_weight, w1, w3, w2, top_k)
        x (T, C), router_weight (E, C), w1 / w3 (E, F, C), w2 (E, C, F)  (nn.Linear layout, stacked)
        y (T, C); aux = dict(balance_loss=scalar, z_loss=scalar, counts=LongTensor (E,))

Each expert is a SwiGLU FFN, y_e(x) = w2_e (silu(w1_e x) * w3_e x), as in a Llama-style decoder, and
y = sum_j gate_j * y_{e_j}(x) over the token's top-k experts.
"""
import os

import torch
import torch.nn.functional as F

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
    counts = torch.bincount(expert_idx.flatten(), minlength=num_experts)  # (E,)
    dispatch_fraction = counts.float() / (num_tokens * top_k)  # f_i: no gradient (argmax)
    balance_loss = num_experts * (dispatch_fraction * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return gates, expert_idx, dict(balance_loss=balance_loss, z_loss=z_loss, counts=counts)


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
# Entry point

def moe_ffn(x, router_weight, w1, w3, w2, top_k):
    """MoE SwiGLU FFN. Triton on CUDA tensors, the reference elsewhere; KERNELS=triton|ref forces one."""
    choice = os.environ.get("KERNELS", "").lower()
    if choice not in ("", "triton", "ref"):
        raise ValueError(f"KERNELS={choice!r}: expected 'triton' or 'ref'")
    return moe_ffn_reference(x, router_weight, w1, w3, w2, top_k)  # Triton path: next commit
