"""kernels/attention.py: the Triton kernels (through TRITON_INTERPRET=1 on CPU) and the SDPA path
against the fp32 reference, forward and all three gradients, on odd shapes.

Tolerance is flash-attn's rule: |path - fp32 ref| <= 2 * |same-dtype PyTorch - fp32 ref| + atol,
per tensor, max over elements. For fp32 the same-dtype PyTorch error is ~0, so atol decides.
"""
import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CI exports it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import attention, attention_reference  # noqa: E402

# `kernels.attention` the attribute is the function (kernels/__init__.py re-exports it); this is the module
attention_module = importlib.import_module("kernels.attention")

ATOL = {torch.float32: 2e-5, torch.float16: 1e-3}
NAMES = ("out", "dq", "dk", "dv")

needs_triton = pytest.mark.skipif(
    not attention_module.HAS_TRITON or not (attention_module.INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need triton and CUDA or TRITON_INTERPRET=1 set before triton was imported")


def make_inputs(batch, h_q, h_kv, n, d, dtype, seed, n_kv=None):
    """Fresh random q, k, v leaves (never zeros) and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    n_kv = n if n_kv is None else n_kv
    q = torch.randn(batch, h_q, n, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, h_kv, n_kv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, h_kv, n_kv, d, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(batch, h_q, n, d, generator=gen).to(dtype)
    return q, k, v, grad_out


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_flash_rule(got, q, k, v, grad_out, label, **kwargs):
    """got = (out, dq, dk, dv) of the path under test; compare with the fp32 and same-dtype references."""
    ref = forward_backward(attention_reference, q, k, v, grad_out, **kwargs)  # fp32 inside
    same_dtype = forward_backward(lambda *a, **kw: attention_reference(*a, upcast=False, **kw), q, k, v, grad_out, **kwargs)
    for name, x, r, p in zip(NAMES, got, ref, same_dtype):
        assert x.shape == r.shape and x.dtype == r.dtype, f"{label} {name}: {x.shape} {x.dtype} vs {r.shape} {r.dtype}"
        assert torch.isfinite(x).all(), f"{label} {name}: non-finite values"
        err = (x.float() - r.float()).abs().max().item()
        err_pt = (p.float() - r.float()).abs().max().item()
        bound = 2 * err_pt + ATOL[q.dtype]
        print(f"{label} {name}: err {err:.2e} (same-dtype torch {err_pt:.2e}, bound {bound:.2e})")
        assert err <= bound, f"{label} {name}: max error {err:.3e} > bound {bound:.3e} (torch same-dtype {err_pt:.3e})"


# (batch, h_q, h_kv, n, d, causal, key_lengths, dtype): every N, D, GQA / MQA, causal on / off,
# padded batches (with an empty sample), fp32 and fp16, each N >= 100 with several blocks per side
TRITON_CASES = [
    (2, 2, 1, 1, 64, True, None, torch.float32),
    (2, 2, 2, 17, 16, False, None, torch.float32),
    (1, 4, 2, 17, 128, True, None, torch.float16),
    (3, 2, 2, 17, 40, True, [17, 0, 9], torch.float32),
    (2, 2, 1, 100, 40, True, [100, 37], torch.float32),
    (2, 2, 1, 100, 64, False, [0, 71], torch.float16),
    (1, 2, 1, 130, 40, False, None, torch.float16),
    (1, 2, 2, 130, 64, True, None, torch.float32),
    (2, 1, 1, 130, 16, True, [130, 1], torch.float16),
]


@needs_triton
@pytest.mark.parametrize("batch,h_q,h_kv,n,d,causal,key_lengths,dtype", TRITON_CASES)
def test_triton_matches_reference(monkeypatch, batch, h_q, h_kv, n, d, causal, key_lengths, dtype):
    monkeypatch.setenv("KERNELS", "triton")
    q, k, v, grad_out = make_inputs(batch, h_q, h_kv, n, d, dtype, seed=n * 1000 + d)
    kwargs = dict(causal=causal, key_lengths=None if key_lengths is None else torch.tensor(key_lengths))
    got = forward_backward(attention, q, k, v, grad_out, **kwargs)
    assert_flash_rule(got, q, k, v, grad_out, f"triton B{batch} H{h_q}/{h_kv} N{n} D{d} causal={causal} "
                      f"lengths={key_lengths} {dtype}", **kwargs)


@needs_triton
def test_triton_scale_strided_inputs_and_cross_attention(monkeypatch):
    """Custom scale, non-contiguous views (B, N, H, D).transpose(1, 2), and Nq != Nkv."""
    monkeypatch.setenv("KERNELS", "triton")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 17, 2, 40, generator=gen).transpose(1, 2).requires_grad_()  # (B, H, Nq, D) view
    k = torch.randn(2, 50, 1, 40, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 50, 1, 40, generator=gen).transpose(1, 2).requires_grad_()
    grad_out = torch.randn(2, 2, 17, 40, generator=gen)
    kwargs = dict(causal=False, scale=0.3, key_lengths=torch.tensor([50, 23]))
    got = forward_backward(attention, q, k, v, grad_out, **kwargs)
    assert_flash_rule(got, q, k, v, grad_out, "triton strided cross-attention scale=0.3", **kwargs)


@needs_triton
def test_triton_empty_sample_gives_zero_output_and_gradients(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    q, k, v, grad_out = make_inputs(2, 2, 1, 20, 16, torch.float32, seed=3)
    out, dq, dk, dv = forward_backward(attention, q, k, v, grad_out, causal=True, key_lengths=torch.tensor([0, 20]))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
    assert out[1].abs().sum() > 0 and dq[1].abs().sum() > 0 and dk[1].abs().sum() > 0


# the SDPA path (CPU default, KERNELS=ref on CUDA) is cheap: a wider matrix
@pytest.mark.parametrize("n", [1, 17, 130])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("key_lengths", [None, [0, 5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_path_matches_reference(monkeypatch, n, causal, key_lengths, dtype):
    monkeypatch.setenv("KERNELS", "ref")
    q, k, v, grad_out = make_inputs(2, 4, 2, n, 40, dtype, seed=n)
    kwargs = dict(causal=causal, key_lengths=None if key_lengths is None else torch.tensor(key_lengths))
    got = forward_backward(attention, q, k, v, grad_out, **kwargs)
    assert_flash_rule(got, q, k, v, grad_out, f"sdpa N{n} causal={causal} lengths={key_lengths} {dtype}", **kwargs)


def test_autocast_runs_in_the_autocast_dtype(monkeypatch):
    """Mixed fp32 / fp16 inputs under autocast run in bf16 (as SDPA does) and send fp32 gradients back."""
    monkeypatch.delenv("KERNELS", raising=False)
    q, k, v, grad_out = make_inputs(2, 2, 1, 9, 16, torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k.half(), v, causal=True)
    assert out.dtype == torch.bfloat16
    expected = attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert (out.float() - expected.float()).abs().max().item() <= 2e-2
    out.float().backward(grad_out)
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_dispatch_follows_device_and_kernels_variable(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "_triton_attention", lambda *a: calls.append("triton") or a[0] * 0)
    q, k, v, _ = make_inputs(1, 2, 1, 5, 16, torch.float32, seed=1)
    monkeypatch.delenv("KERNELS", raising=False)
    attention(q, k, v)  # CPU tensors: SDPA
    monkeypatch.setenv("KERNELS", "ref")
    attention(q, k, v)
    assert calls == []
    monkeypatch.setenv("KERNELS", "triton")
    attention(q, k, v)
    assert calls == ["triton"]
    monkeypatch.setenv("KERNELS", "cuda")
    with pytest.raises(ValueError, match="KERNELS='cuda'"):
        attention(q, k, v)


def test_bad_inputs_raise_one_line_reasons():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="causal=True needs as many queries as keys"):
        attention(q, q[:, :, :4], q[:, :, :4], causal=True)
    with pytest.raises(ValueError, match="key_lengths must be an integer tensor"):
        attention(q, q, q, key_lengths=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
