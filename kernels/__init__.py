"""Shared GPU ops for every script's model: Triton kernels with plain-PyTorch references.

    from kernels import attention, moe_ffn

`attention(q, k, v, causal=..., scale=None, key_lengths=None, key_mask=None, doc_ids=None)` (causal
bottom-right aligned when Nq < Nkv; key_mask (B, Nkv) bool; doc_ids (B, Nkv) packed-document ids) and
`moe_ffn(x, router_weight, w1, w3, w2, top_k)` run the Triton kernels on CUDA tensors of fp16 / bf16 /
fp32 and the PyTorch path elsewhere. `KERNELS=triton` / `KERNELS=ref` in the environment forces one path
(kernels/_common.py; the tests force Triton on CPU through TRITON_INTERPRET=1).
"""
from kernels.attention import attention, attention_reference  # noqa: F401
from kernels.moe import moe_ffn, moe_ffn_reference, route  # noqa: F401
