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

from kernels import _common, attention, attention_reference  # noqa: E402

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
    same_dtype = forward_backward(lambda *a, **kw: attention_reference(*a, upcast=False, **kw), q, k, v,
                                  grad_out, **kwargs)
    for name, x, r, p in zip(NAMES, got, ref, same_dtype):
        assert x.shape == r.shape and x.dtype == r.dtype, \
            f"{label} {name}: {x.shape} {x.dtype} vs {r.shape} {r.dtype}"
        assert torch.isfinite(x).all(), f"{label} {name}: non-finite values"
        err = (x.float() - r.float()).abs().max().item()
        err_pt = (p.float() - r.float()).abs().max().item()
        bound = 2 * err_pt + ATOL[q.dtype]
        print(f"{label} {name}: err {err:.2e} (same-dtype torch {err_pt:.2e}, bound {bound:.2e})")
        assert err <= bound, \
            f"{label} {name}: max error {err:.3e} > bound {bound:.3e} (torch same-dtype {err_pt:.3e})"


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
    (1, 16, 2, 20, 8, True, None, torch.float32),  # GQA 16:2, D = 8 (padded to 16)
    (2, 2, 1, 37, 96, False, [5, 37], torch.float16),  # D = 96 (padded to 128)
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
    out, dq, dk, dv = forward_backward(attention, q, k, v, grad_out, causal=True,
                                       key_lengths=torch.tensor([0, 20]))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
    assert out[1].abs().sum() > 0 and dq[1].abs().sum() > 0 and dk[1].abs().sum() > 0


# ----------------------------------------------------------------------------- masks

def doc_ids_of(*rows):
    """(B, N) document ids from per-row document lengths, ids counting up within each row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)),
                                                torch.tensor(lengths)) for lengths in rows])


# documents of lengths 1, 7 and 40 (plus 3: N = 51, odd) in one row, one document in the other
DOCS_1_7_40 = doc_ids_of([1, 7, 40, 3], [51])
# sample 1 hides every key: all its queries see nothing (output 0, zero gradients)
KEY_MASK_51 = torch.stack([torch.arange(51) % 3 != 1, torch.zeros(51, dtype=torch.bool)])

# (label, batch, h_q, h_kv, n_q, n_kv, causal, masks, dtype); d = 16, or 40 (not a power of two) where noted
MASK_CASES = [
    ("docs causal GQA", 2, 4, 2, 51, 51, True, dict(doc_ids=DOCS_1_7_40), torch.float32),
    ("docs bidirectional fp16", 2, 2, 1, 51, 51, False, dict(doc_ids=DOCS_1_7_40), torch.float16),
    ("decode Nq=1 offset", 2, 4, 1, 1, 40, True, {}, torch.float32),
    ("chunk Nq=5 offset fp16", 2, 2, 2, 5, 40, True, dict(key_lengths=torch.tensor([40, 23])), torch.float16),
    ("Nq=5 offset + docs", 2, 2, 1, 5, 51, True, dict(doc_ids=DOCS_1_7_40), torch.float32),
    ("Nq > Nkv offset", 1, 2, 1, 45, 30, True, {}, torch.float32),
    ("key mask hides a sample", 2, 4, 2, 51, 51, False, dict(key_mask=KEY_MASK_51), torch.float32),
    ("key mask + causal + docs", 2, 4, 2, 51, 51, True, dict(key_mask=KEY_MASK_51, doc_ids=DOCS_1_7_40),
     torch.float16),
    ("everything, Nq=5", 2, 2, 1, 5, 51, True,
     dict(key_mask=KEY_MASK_51, doc_ids=DOCS_1_7_40, key_lengths=torch.tensor([49, 51])), torch.float32),
]


@needs_triton
@pytest.mark.parametrize("label,batch,h_q,h_kv,n_q,n_kv,causal,masks,dtype", MASK_CASES,
                         ids=[case[0] for case in MASK_CASES])
def test_triton_masks_match_reference(monkeypatch, label, batch, h_q, h_kv, n_q, n_kv, causal, masks, dtype):
    monkeypatch.setenv("KERNELS", "triton")
    q, k, v, grad_out = make_inputs(batch, h_q, h_kv, n_q, 16, dtype, seed=n_q * 100 + n_kv, n_kv=n_kv)
    got = forward_backward(attention, q, k, v, grad_out, causal=causal, **masks)
    assert_flash_rule(got, q, k, v, grad_out, f"triton {label} {dtype}", causal=causal, **masks)
    if "key_mask" in masks and not masks["key_mask"][1].any():  # the hidden sample: exact zeros
        assert all(torch.equal(t[1], torch.zeros_like(t[1])) for t in got)


@pytest.mark.parametrize("label,batch,h_q,h_kv,n_q,n_kv,causal,masks,dtype", MASK_CASES,
                         ids=[case[0] for case in MASK_CASES])
def test_sdpa_path_masks_match_reference(monkeypatch, label, batch, h_q, h_kv, n_q, n_kv, causal, masks,
                                         dtype):
    monkeypatch.setenv("KERNELS", "ref")
    q, k, v, grad_out = make_inputs(batch, h_q, h_kv, n_q, 40, dtype, seed=n_q * 100 + n_kv, n_kv=n_kv)
    got = forward_backward(attention, q, k, v, grad_out, causal=causal, **masks)
    assert_flash_rule(got, q, k, v, grad_out, f"sdpa {label} {dtype}", causal=causal, **masks)


def test_reference_masks_mean_what_the_docstring_says():
    """The oracle against independent spellings: documents = separate attention per document; the causal
    offset = the last Nq rows of a square causal attention; key_mask = deleting the hidden keys."""
    q, k, v, _ = make_inputs(2, 2, 2, 51, 8, torch.float64, seed=11)
    packed = attention_reference(q, k, v, causal=True, doc_ids=DOCS_1_7_40)
    start = 0
    for length in [1, 7, 40, 3]:
        part = slice(start, start + length)
        alone = attention_reference(q[:1, :, part], k[:1, :, part], v[:1, :, part], causal=True)
        torch.testing.assert_close(packed[:1, :, part], alone)
        start += length
    torch.testing.assert_close(packed[1:], attention_reference(q[1:], k[1:], v[1:], causal=True))
    square = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(attention_reference(q[:, :, -5:], k, v, causal=True), square[:, :, -5:])
    keep = KEY_MASK_51[0]
    torch.testing.assert_close(attention_reference(q[:1], k[:1], v[:1], key_mask=KEY_MASK_51[:1]),
                               attention_reference(q[:1], k[:1, :, keep], v[:1, :, keep]))


@needs_triton
# the dK / dV kernel recomputes P for hidden keys too (exp2 overflows to inf there) and zeroes their rows at
# the end; the interpreter's numpy warns about those rows
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2",
                            "ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("masks", [dict(key_lengths=torch.tensor([9, 20])),
                                   dict(key_mask=torch.arange(20).repeat(2, 1) < 9)])
def test_triton_hides_keys_when_every_visible_score_is_very_negative(monkeypatch, masks):
    """Visible scores near -2e6 (log2 units): a finite 'minus infinity' of -1e6 would give the hidden keys
    all the weight. The output must be the plain mean of the visible values, as in the reference."""
    monkeypatch.setenv("KERNELS", "triton")
    q = torch.ones(2, 1, 20, 16, requires_grad=True)
    keys = torch.ones(2, 1, 20, 16)
    keys[:, :, :9] = -1.0  # visible keys score -16 * scale, hidden ones +16 * scale
    k = keys.requires_grad_()
    v = torch.randn(2, 1, 20, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad_out = torch.randn(2, 1, 20, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(scale=1e5, **masks)
    got = forward_backward(attention, q, k, v, grad_out, **kwargs)
    visible_mean = v[0, 0, :9].mean(0)
    torch.testing.assert_close(got[0][0, 0], visible_mean.expand(20, 16).detach())
    ref = forward_backward(attention_reference, q, k, v, grad_out, **kwargs)
    # the backward rebuilds P = exp2(S - LSE) from scores near 2e6, where one fp32 ulp is 0.25: P is only
    # good to ~20% there (the reference subtracts the row max exactly); dQ is pure cancellation (all
    # visible keys are equal), so its scale is that of dV
    for name, x, r in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), name
        bound = 0.25 * r.abs().max().item() + 0.1
        assert (x - r).abs().max().item() <= bound, f"{name}: {(x - r).abs().max().item():.3g} > {bound:.3g}"
    torch.testing.assert_close(got[0], ref[0])
    assert torch.equal(got[2][0, :, 9:], torch.zeros_like(got[2][0, :, 9:]))  # hidden keys: dK = 0


@needs_triton
def test_triton_reads_expanded_kv_and_keeps_the_callers_layout(monkeypatch):
    """k / v broadcast over heads with expand() (stride 0), q and dO (B, N, H, D) views: read in place
    (no .contiguous() call at all); the output comes back in q's memory layout, so the caller's
    transpose(1, 2).reshape is free."""
    monkeypatch.setenv("KERNELS", "triton")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 19, 4, 16, generator=gen).transpose(1, 2).requires_grad_()  # (B, H, N, D) view
    k_one = torch.randn(2, 1, 19, 16, generator=gen).requires_grad_()
    v_one = torch.randn(2, 1, 19, 16, generator=gen).requires_grad_()
    k, v = k_one.expand(2, 2, 19, 16), v_one.expand(2, 2, 19, 16)  # stride 0 over the 2 kv heads
    grad_out = torch.randn(2, 4, 19, 16, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **kw: copies.append(tuple(t.shape))
                        or contiguous(t, *a, **kw))
    out = attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    monkeypatch.undo()
    assert copies == [], f"copies of {copies}"  # q, k, v and dO are read through their strides
    monkeypatch.setenv("KERNELS", "triton")
    assert_flash_rule(got, q, k, v, grad_out, "triton expand()", causal=True)


@needs_triton
def test_rows_past_int32_offsets_are_refused(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    q = torch.empty(1, 1, 4, 16, device="meta")  # shapes and strides only: nothing is allocated
    wide = torch.empty_strided((1, 1, 4, 16), (0, 0, 2**29, 1), device="meta")  # rows 2^29 elements apart
    with pytest.raises(ValueError, match="int32 row offsets"):
        attention_module._triton_attention(q, wide, wide, causal=False, scale=None, key_lengths=None)


@needs_triton
def test_bf16_on_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter cannot run bf16"):
        attention(q, q, q)


def test_default_dispatch_by_device_and_dtype(monkeypatch):
    """fp64 on CUDA runs the PyTorch path; kernel dtypes on CUDA run Triton; nothing else does."""
    from types import SimpleNamespace
    monkeypatch.delenv("KERNELS", raising=False)
    cuda = lambda dtype: SimpleNamespace(is_cuda=True, dtype=dtype)
    assert not _common.use_triton("attention", cuda(torch.float64))
    assert _common.use_triton("attention", cuda(torch.bfloat16)) == _common.HAS_TRITON
    assert not _common.use_triton("attention", cuda(torch.float16), kernels_fit=False)  # e.g. D = 256
    assert not _common.use_triton("attention", SimpleNamespace(is_cuda=False, dtype=torch.float32))
    monkeypatch.setenv("KERNELS", " Triton ")  # parsed like moe_ffn does: trimmed, any case
    assert _common.forced_path() == "triton"


def test_autotune_keys_bucket_lengths_and_decode_takes_one_tile(monkeypatch):
    """Nearby lengths share a tuning key (no re-tune per generated token); Nq <= 16 takes the fixed decode
    tile untimed; under DDP every rank takes the first config. Grids are 1-D (no 65535 limit on y / z)."""
    launches = []

    class Recorder:  # stands in for the autotuned kernel: records the launch instead of running it
        keys = attention_module._attn_fwd.keys

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(attention_module, "_attn_fwd", Recorder())
    monkeypatch.setenv("KERNELS", "triton")
    for n in (100, 120, 130):
        q = torch.randn(1, 2, n, 16)
        attention(q, q, q, causal=True)
    keys = [tuple(kwargs[name] for name in Recorder.keys) for _, kwargs in launches]
    assert "N_Q" not in Recorder.keys and "N_Q_BUCKET" in Recorder.keys
    assert keys[0] == keys[1] != keys[2]
    assert all(len(grid({"BLOCK_M": 16, "BLOCK_N": 16})) == 1 for grid, _ in launches)
    assert [_common.length_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025)] == [1, 16, 32, 1024, 1024, 2048]

    configs = ["big", "medium", "decode"]
    assert _common.prune_configs(configs, 5, decode_config="decode") == ["decode"]
    assert _common.prune_configs(configs, 17, decode_config="decode") == ["big", "medium"]
    assert _common.prune_configs(["only"], 100, decode_config="only") == ["only"]
    for n_q in (1, 16, 17, 100):  # the kernel's own prune hook, on this platform's list
        assert attention_module._prune_fwd(attention_module.FWD_CONFIGS, {"N_Q": n_q})
    monkeypatch.setattr(_common, "_more_than_one_rank", lambda: True)
    assert _common.prune_configs(configs, 17, decode_config="decode") == ["big"]


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
    assert_flash_rule(got, q, k, v, grad_out, f"sdpa N{n} causal={causal} lengths={key_lengths} {dtype}",
                      **kwargs)


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
    with pytest.raises(ValueError, match=r"doc_ids needs Nq <= Nkv"):
        attention(q, q[:, :, :4], q[:, :, :4], doc_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \(1, 8\)"):
        attention(q, q, q, key_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"doc_ids must be an integer tensor"):
        attention(q, q, q, doc_ids=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="key_lengths must be an integer tensor"):
        attention(q, q, q, key_lengths=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])


def test_bench_command_line_parses_without_a_gpu():
    """`python kernels/bench.py all --quick` (the GPU check of results/kernels.md): the CPU side of it."""
    bench = importlib.import_module("kernels.bench")
    name, opts = bench.parse_args(["all", "--quick"])
    assert name == "all"
    assert (opts["n"], opts["d"], opts["causal"], opts["tokens"], opts["experts"], opts["top_k"]) == \
        ("2048,8192", "128", "true", "16384", "8,64", "2")
    assert bench.parse_args(["moe", "--experts=64"])[1]["experts"] == "64"
    for bad in ([], ["everything"], ["all", "bogus=1"], ["attention", "tokens=5"], ["attention", "n=2k"],
                ["attention", "causal=maybe"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


# ------------------------------------------------------------------- the CUDA path compiles (no GPU needed)

POINTER_TYPES = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", DO="*bf16", DQ="*bf16", DK="*bf16",
                     DV="*bf16", LSE="*fp32", Delta="*fp32", KeyLen="*i32", DocStart="*i32", DocEnd="*i32",
                     KeyMask="*i8")


def compile_kernels_for_hopper():
    """Compile the four kernels for sm_90 with bf16 pointers, every mask on and every mask off (the
    benchmarked path), at D = 128 with the largest tiles of the GPU config lists; in a subprocess without
    TRITON_INTERPRET (the interpreter patches triton.language in-process). Catches what the interpreter
    accepts but the compiler does not."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = [(attention_module._attn_bwd_preprocess, dict(BLOCK_M=128), False)]
    for masks in (True, False):
        launches += [(attention_module._attn_fwd, dict(BLOCK_M=128, BLOCK_N=64), masks),
                     (attention_module._attn_bwd_dkdv, dict(BLOCK_M=32, BLOCK_N=128), masks),
                     (attention_module._attn_bwd_dq, dict(BLOCK_M=128, BLOCK_N=64), masks)]
    for kernel, tiles, masks in launches:
        constants = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=masks, HAS_LENGTHS=masks, HAS_DOCS=masks,
                         HAS_KEY_MASK=masks, **tiles)
        jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        signature, values, attrs = {}, {}, {}
        for i, name in enumerate(jit_fn.arg_names):
            if name in constants:
                signature[name], values[name] = "constexpr", constants[name]
            elif name in POINTER_TYPES:
                signature[name], attrs[(i,)] = POINTER_TYPES[name], [["tt.divisibility", 16]]
            else:  # strides, lengths, head counts; the two softmax scales are floats
                signature[name] = "fp32" if name.endswith("scale") else "i32"
        source = ASTSource(jit_fn, signature, values, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=8, num_stages=3))
        print(jit_fn.__name__, f"masks={masks}", "shared bytes", compiled.metadata.shared,
              "wgmma" if "wgmma" in compiled.asm["ptx"] else "")


def compile_in_subprocess(module):
    """Run `module`.compile_kernels_for_hopper() in a fresh interpreter-free Python; returns its stdout.
    Skips when this triton has no NVIDIA backend. (tests/test_moe.py uses it too.)"""
    import subprocess
    import sys

    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import {module} as t; t.compile_kernels_for_hopper()"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@needs_triton
def test_kernels_compile_for_hopper_gpu():
    stdout = compile_in_subprocess("tests.test_attention")
    assert stdout.count("wgmma") == 6, stdout  # the three matmul kernels use tensor cores, masks on and off
