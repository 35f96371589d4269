"""Shared GPU ops for every script's model: Triton kernels with plain-PyTorch references.

    from kernels import attention, moe_ffn

`attention(q, k, v, causal=..., scale=None, key_lengths=None)` and
`moe_ffn(x, router_weight, w1, w3, w2, top_k)` run the Triton kernels on CUDA tensors and the
PyTorch path elsewhere. `KERNELS=triton` / `KERNELS=ref` in the environment forces one path
(the tests force Triton on CPU through TRITON_INTERPRET=1).
"""
from kernels.attention import attention, attention_reference  # noqa: F401
from kernels.moe import moe_ffn, moe_ffn_reference, route  # noqa: F401
