"""kernels/moe.py: router losses by hand, the dispatch plan, and the Triton MoE FFN (forward and every
gradient) against the per-expert PyTorch loop, run on CPU through the Triton interpreter."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere: kernels run on CPU

import pytest
import torch

from kernels import moe
from tests.test_attention import compile_in_subprocess

needs_triton = pytest.mark.skipif(not moe.HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def nan_filled_empty_tensors():
    """Deterministic mode makes torch.empty return NaNs: padding rows and the unused tail of the sorted
    buffers are never initialised, so any kernel that reads them would poison the compared results."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_on)


def make_inputs(num_tokens, d_model, d_ff, num_experts, dtype=torch.float32, seed=0):
    """Random x, router and expert weights at 1/sqrt(fan_in) scale (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return (rand(num_tokens, d_model), rand(num_experts, d_model),
            rand(num_experts, d_ff, d_model, scale=d_model ** -0.5),
            rand(num_experts, d_ff, d_model, scale=d_model ** -0.5),
            rand(num_experts, d_model, d_ff, scale=d_ff ** -0.5))


def run_with_grads(fn, inputs, top_k, upstream_seed=1):
    """y, aux and the gradients of every input for loss = <y, g> + balance_loss + z_loss (g fixed)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, aux = fn(*leaves, top_k)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(y.dtype)
    ((y.float() * upstream.float()).sum() + aux["balance_loss"] + aux["z_loss"]).backward()
    return y.detach(), aux, [t.grad for t in leaves]


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_to_reference(inputs, top_k, tol=1e-5):
    """Triton vs the per-expert loop, same dtype: output, aux and the 5 gradients, relative to scale."""
    y_ref, aux_ref, grads_ref = run_with_grads(moe.moe_ffn_reference, inputs, top_k)
    y_tri, aux_tri, grads_tri = run_with_grads(moe.moe_ffn_triton, inputs, top_k)
    assert torch.equal(aux_ref["counts"], aux_tri["counts"])
    for key in ("balance_loss", "z_loss"):
        torch.testing.assert_close(aux_tri[key], aux_ref[key])
    names = ["y", "dx", "drouter", "dw1", "dw3", "dw2"]
    for name, ref, tri in zip(names, [y_ref, *grads_ref], [y_tri, *grads_tri]):
        scale = ref.float().abs().max().item() + 1e-6
        error = max_error(tri, ref)
        print(f"{name}: max error {error:.2e} at scale {scale:.2e}")
        assert error <= tol * scale, f"{name}: max error {error:.3g} at scale {scale:.3g}"
    return aux_tri


# ---------------------------------------------------------------- router losses, by hand

def test_losses_and_gates_hand_computed():
    # top-1, E=2: both tokens pick expert 0 (probs [3/4, 1/4]), so f = [1, 0], P = [3/4, 1/4]
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    gates, expert_idx, aux = moe.route(logits, top_k=1)
    assert expert_idx.flatten().tolist() == [0, 0] and torch.equal(gates, torch.ones(2, 1))
    assert aux["counts"].tolist() == [2, 0]
    torch.testing.assert_close(aux["balance_loss"], torch.tensor(2 * (1.0 * 0.75 + 0.0 * 0.25)))
    torch.testing.assert_close(aux["z_loss"], torch.tensor(math.log(4.0) ** 2))
    # d(balance)/d(logits): only P depends on them; dP_0/dl_0 = p0 (1 - p0) / T per token
    aux["balance_loss"].backward()
    torch.testing.assert_close(logits.grad[:, 0], torch.full((2,), 2 * 0.75 * 0.25 / 2))

    # top-2, E=3: probs [4/7, 2/7, 1/7] -> experts (0, 1) with renormalised gates [2/3, 1/3]
    logits = torch.log(torch.tensor([[4.0, 2.0, 1.0], [1.0, 2.0, 4.0]]))
    gates, expert_idx, aux = moe.route(logits, top_k=2)
    assert expert_idx.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(gates, torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3]]))
    assert aux["counts"].tolist() == [1, 2, 1]
    # f = [1/4, 2/4, 1/4], P = [5/14, 4/14, 5/14] -> 3 * (5/56 + 8/56 + 5/56) = 54/56
    torch.testing.assert_close(aux["balance_loss"], torch.tensor(3 * 18 / 56))
    torch.testing.assert_close(aux["z_loss"], torch.tensor(math.log(7.0) ** 2))


def test_uniform_router_has_unit_balance_loss():
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1.0  # every expert chosen by 2 of 8 tokens, top-1
    _, _, aux = moe.route(logits, top_k=1)
    torch.testing.assert_close(aux["balance_loss"], torch.tensor(1.0))


# ---------------------------------------------------------------- dispatch plan

def test_dispatch_plan_sorts_pads_and_inverts():
    num_tokens, top_k, num_experts, block_m = 37, 2, 6, 16
    gen = torch.Generator().manual_seed(0)
    expert_idx = torch.stack([torch.randperm(num_experts - 1,
                                             generator=gen)[:top_k] for _ in range(num_tokens)])
    plan = moe.plan_dispatch(expert_idx, num_experts, block_m)  # expert 5 gets no token
    num_pairs = num_tokens * top_k
    real = plan.sorted_pair < num_pairs
    assert sorted(plan.sorted_pair[real].tolist()) == list(range(num_pairs))  # each pair exactly once
    assert torch.equal(plan.sorted_pair[plan.pair_position.flatten()], torch.arange(num_pairs))
    counts = torch.bincount(expert_idx.flatten(), minlength=num_experts)
    seg = plan.segment_offsets
    assert seg[0] == 0 and torch.all(seg % block_m == 0) and seg[-1] <= plan.sorted_pair.numel()
    for e in range(num_experts):
        rows = plan.sorted_pair[seg[e]:seg[e + 1]]
        pairs = rows[rows < num_pairs]
        assert len(pairs) == counts[e] and seg[e + 1] - seg[e] == -(-counts[e] // block_m) * block_m
        assert torch.all(expert_idx.flatten()[pairs] == e) and torch.all(pairs.diff() > 0)  # stable sort
        assert torch.all(plan.block_expert[seg[e] // block_m:seg[e + 1] // block_m] == e)
    assert torch.all(plan.block_expert[seg[-1] // block_m:] == num_experts)  # past the end: skipped
    assert torch.all(plan.sorted_pair[seg[-1]:] == num_pairs)


# ---------------------------------------------------------------- Triton vs the per-expert loop

@needs_triton
@pytest.mark.parametrize("num_tokens, d_model, d_ff, num_experts, top_k", [
    (13, 32, 40, 4, 2),   # 26 pairs: not a multiple of BLOCK_M; d_ff not a multiple of BLOCK_N
    (21, 48, 24, 8, 1),   # top-1; d_model not a multiple of BLOCK_K
    (24, 32, 32, 64, 2),  # E = 64: most experts get no token, some get one
    (9, 16, 24, 4, 4),    # top_k = E: every token visits every expert
    (1, 16, 24, 8, 2),    # T = 1
])
def test_triton_matches_reference_fp32(num_tokens, d_model, d_ff, num_experts, top_k):
    aux = assert_close_to_reference(make_inputs(num_tokens, d_model, d_ff, num_experts), top_k)
    if num_experts == 64:
        assert (aux["counts"] == 0).any()


@needs_triton
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(top_k):
    x, router, w1, w3, w2 = make_inputs(19, 32, 40, 4)
    x[:, 0] = x[:, 0].abs() + 1.0  # a positive feature ...
    router[2, 0] = 100.0  # ... that expert 2 alone reads with a huge weight: every token's first choice
    aux = assert_close_to_reference((x, router, w1, w3, w2), top_k)
    assert aux["counts"][2] == 19 and aux["counts"].sum() == 19 * top_k
    if top_k == 1:
        assert aux["counts"].tolist() == [0, 0, 19, 0]
        _, _, grads = run_with_grads(moe.moe_ffn_triton, (x, router, w1, w3, w2), top_k)
        for grad_w in grads[2:]:  # experts that got no token get exactly zero weight gradients
            assert torch.equal(grad_w[[0, 1, 3]], torch.zeros_like(grad_w[[0, 1, 3]]))
            assert grad_w[2].abs().sum() > 0


@needs_triton
def test_triton_fp16_error_within_twice_reference_error():
    """fp16: both paths against an fp32 oracle; the kernels may not be much worse than torch in fp16."""
    inputs32 = make_inputs(13, 32, 40, 4)
    y32, _, grads32 = run_with_grads(moe.moe_ffn_reference, inputs32, 2)
    inputs16 = [t.half() for t in inputs32]
    y_ref, _, grads_ref = run_with_grads(moe.moe_ffn_reference, inputs16, 2)
    y_tri, _, grads_tri = run_with_grads(moe.moe_ffn_triton, inputs16, 2)
    assert y_tri.dtype == torch.float16
    for exact, ref, tri in zip([y32, *grads32], [y_ref, *grads_ref], [y_tri, *grads_tri]):
        assert max_error(tri, exact) <= 2 * max_error(ref, exact) + 1e-3 * exact.abs().max().item()


@needs_triton
def test_triton_under_autocast_casts_like_autocast():
    """fp32 parameters under fp16 autocast: the kernels run in fp16, gradients reach the fp32 leaves."""
    inputs = make_inputs(13, 32, 40, 4)
    y32, _, grads32 = run_with_grads(moe.moe_ffn_reference, inputs, 2)
    with torch.autocast("cpu", dtype=torch.float16):
        y, _, grads = run_with_grads(moe.moe_ffn_triton, inputs, 2)
    assert y.dtype == torch.float16 and all(g.dtype == torch.float32 for g in grads)
    for exact, got in zip([y32, *grads32], [y, *grads]):
        assert max_error(got, exact) <= 5e-3 * exact.abs().max().item() + 1e-3


@needs_triton
def test_routing_never_calls_bincount(monkeypatch):
    """bincount reads min / max back to the host on CUDA; routing counts with scatter_add_ instead
    (the bench checks the whole forward under torch.cuda.set_sync_debug_mode("error") on a GPU)."""
    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount synchronises with the host on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    inputs = make_inputs(13, 32, 40, 4)
    _, aux = moe.moe_ffn_triton(*inputs, 2)
    monkeypatch.undo()
    _, expert_idx, _ = moe.route(moe.router_logits(inputs[0], inputs[1]), 2)
    assert torch.equal(aux["counts"], torch.bincount(expert_idx.flatten(), minlength=4))


@needs_triton
def test_gemm_tuning_key_buckets_the_row_count(monkeypatch):
    """Nearby token counts share a GEMM tuning key (no re-tune per batch shape)."""
    launches = []

    arg_names, key_names = moe.grouped_matmul_kernel.arg_names, moe.grouped_matmul_kernel.keys

    class Recorder:  # stands in for the autotuned kernel: records the launch instead of running it
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append({**dict(zip(arg_names, args)), **kwargs})

    monkeypatch.setattr(moe, "grouped_matmul_kernel", Recorder())
    for num_tokens in (13, 15, 17):  # 26, 30, 34 (token, slot) pairs
        x, router, w1, w3, w2 = make_inputs(num_tokens, 32, 40, 4)
        plan = moe.plan_dispatch(moe.route(moe.router_logits(x, router), 2)[1], 4, moe.BLOCK_M)
        moe.grouped_matmul(x, w1, plan, gather=True, w3=w3)
    assert "ROWS_BUCKET" in key_names and "num_pairs" not in key_names
    keys = [tuple(launch[name] for name in key_names) for launch in launches]
    assert keys[0] == keys[1] != keys[2]


@needs_triton
def test_swiglu_backward_leaves_the_padded_tail_alone():
    """Rows past the last expert's segment are never written by the forward: the backward skips them."""
    x, router, w1, w3, _ = make_inputs(13, 32, 40, 4)
    plan = moe.plan_dispatch(moe.route(moe.router_logits(x, router), 2)[1], 4, moe.BLOCK_M)
    h13, _ = moe.grouped_matmul(x, w1, plan, gather=True, w3=w3)  # (R, 80)
    grad_act = torch.randn(h13.shape[0], 40)
    grad_h13 = torch.full_like(h13, 7.0)
    moe.swiglu_backward_kernel[(math.ceil(grad_act.numel() / moe.ELEMENTWISE_BLOCK),)](
        grad_act, h13, grad_h13, plan.segment_offsets, 4, 40, BLOCK=moe.ELEMENTWISE_BLOCK)
    end = int(plan.segment_offsets[-1])
    assert end < h13.shape[0] and torch.all(grad_h13[end:] == 7.0)
    h1, h3 = h13[:end, :40].requires_grad_(), h13[:end, 40:].requires_grad_()
    (torch.nn.functional.silu(h1) * h3).backward(grad_act[:end])
    torch.testing.assert_close(grad_h13[:end], torch.cat([h1.grad, h3.grad], 1))


@needs_triton
def test_bf16_on_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    inputs = [t.bfloat16() for t in make_inputs(5, 16, 16, 4)]
    with pytest.raises(ValueError, match="interpreter cannot run bf16"):
        moe.moe_ffn(*inputs, 2)


# ---------------------------------------------------------------- the CUDA path compiles (no GPU needed)

def compile_kernels_for_hopper():
    """Compile the kernels for sm_90 with bf16 pointers, specialised as a launch at MM1-MoE size would be
    (ints equal to 1 become constants, multiples of 16 get divisibility hints), the up projection both
    gated (w1 and w3 in one GEMM), plain, and summing (its dX); in a subprocess without TRITON_INTERPRET,
    since the interpreter patches triton.language in-process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tokens, d_model, d_ff, num_experts, top_k = 4096, 1024, 2816, 64, 2
    pairs = tokens * top_k
    gemm = dict(N=d_ff, K=d_model, stride_am=d_model, stride_ak=1, stride_we=d_ff * d_model,
                stride_wn=d_model,
                stride_wk=1, stride_om=2 * d_ff, stride_on=1, stride_actm=d_ff, stride_gm=d_ff, stride_gn=1,
                num_pairs=pairs, num_experts=num_experts, ROWS_BUCKET=pairs, TOP_K=top_k, GATHER=True,
                BLOCK_M=moe.BLOCK_M, BLOCK_N=128, BLOCK_K=64)
    combine = dict(N=d_model, stride_r=d_model, stride_o=d_model, stride_g=d_model, TOP_K=top_k, BLOCK_N=1024)
    fp32_ptrs = ("weight_ptr", "grad_weight_ptr")
    int_ptrs = ("sorted_pair_ptr", "block_expert_ptr", "segment_offsets_ptr", "pair_position_ptr")
    elementwise = dict(num_experts=num_experts, F_DIM=d_ff, BLOCK=moe.ELEMENTWISE_BLOCK)
    for kernel, values in [(moe.grouped_matmul_kernel, dict(gemm, GATED=True, SUM_W3=False)),
                           (moe.grouped_matmul_kernel, dict(gemm, GATED=False, SUM_W3=False)),
                           (moe.grouped_matmul_kernel, dict(gemm, GATED=False, SUM_W3=True)),
                           (moe.grouped_weight_grad_kernel, gemm),
                           (moe.combine_kernel, combine), (moe.combine_backward_kernel, combine),
                           (moe.swiglu_backward_kernel, elementwise)]:
        jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        signature, constants, attrs = {}, {}, {}
        for i, name in enumerate(jit_fn.arg_names):
            if name.endswith("_ptr"):
                signature[name] = "*i64" if name in int_ptrs else "*fp32" if name in fp32_ptrs else "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name.isupper() or values[name] == 1:
                signature[name], constants[name] = "constexpr", values[name]
            else:
                signature[name] = "i32"
                if values[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(jit_fn, signature, constants, attrs), target=GPUTarget("cuda",
                                                                                                   90, 32),
                                  options=dict(num_warps=4, num_stages=3))
        uses_tensor_cores = "wgmma" in compiled.asm["ptx"]
        print(jit_fn.__name__, "shared bytes", compiled.metadata.shared, "wgmma" if uses_tensor_cores else "")
        assert uses_tensor_cores == ("grouped" in jit_fn.__name__), jit_fn.__name__


@needs_triton
def test_kernels_compile_for_hopper_gpu():
    stdout = compile_in_subprocess("tests.test_moe")
    assert stdout.count("wgmma") == 4, stdout  # the grouped GEMM (gated, plain, summing) and the weight grad


# ---------------------------------------------------------------- entry point

def test_entry_point_dispatch(monkeypatch):
    inputs = make_inputs(5, 16, 16, 4)
    called = []
    monkeypatch.setattr(moe, "moe_ffn_triton", lambda *args: called.append("triton") or ("T", None))
    monkeypatch.setattr(moe, "moe_ffn_reference", lambda *args: called.append("ref") or ("R", None))
    monkeypatch.delenv("KERNELS", raising=False)
    assert moe.moe_ffn(*inputs, 2)[0] == "R"  # CPU tensors: the reference
    monkeypatch.setenv("KERNELS", "triton")
    if moe.HAS_TRITON:
        assert moe.moe_ffn(*inputs, 2)[0] == "T"
    monkeypatch.setenv("KERNELS", "ref")
    assert moe.moe_ffn(*inputs, 2)[0] == "R"
    monkeypatch.setenv("KERNELS", "cuda")
    with pytest.raises(ValueError, match="KERNELS"):
        moe.moe_ffn(*inputs, 2)


def test_bad_shapes_are_named():
    x, router, w1, w3, w2 = make_inputs(5, 16, 24, 4)
    with pytest.raises(ValueError, match="w2 has shape"):
        moe.moe_ffn_reference(x, router, w1, w3, w2.transpose(1, 2), 2)
    with pytest.raises(ValueError, match="top_k=5"):
        moe.moe_ffn_reference(x, router, w1, w3, w2, 5)
    with pytest.raises(ValueError, match=r"x must be \(T, C\)"):
        moe.moe_ffn_reference(x[None], router, w1, w3, w2, 2)
    if moe.HAS_TRITON:
        with pytest.raises(ValueError, match="one dtype"):
            moe.moe_ffn_triton(x, router, w1.half(), w3, w2, 2)
