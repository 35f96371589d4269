"""Benchmark tables for kernels/ (a script, not a test).

    python kernels/bench.py attention     # TFLOP/s fwd / bwd / fwd+bwd vs torch SDPA and a naive version
    python kernels/bench.py moe           # tokens/s vs a per-expert loop and a dense SwiGLU

Needs a CUDA GPU for meaningful numbers.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere


def time_ms(fn, warmup=5, iters=20):
    """Median milliseconds of fn() on the current CUDA device (CUDA events, after warmup)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_attention(argv):
    raise SystemExit("attention benchmark: being written (issue 3)")


def bench_moe(argv):
    """MoE SwiGLU FFN, bf16, top-k: Triton grouped GEMM vs the per-expert loop vs a dense SwiGLU of the
    same active FLOPs (d_ff = k * F, no router). Options: tokens=4096,16384 experts=8,64 top_k=2
    d_model=1024 d_ff=2816, as key=value. First checks the Triton path against an fp32 reference."""
    from kernels import moe

    opts = dict(tokens="4096,16384", experts="8,64", top_k="2", d_model="1024", d_ff="2816")
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts:
            raise SystemExit(f"bench moe: unknown option {key!r} (known: {', '.join(opts)})")
        opts[key] = value
    token_counts, expert_counts = [[int(v) for v in opts[k].split(",")] for k in ("tokens", "experts")]
    top_k, d_model, d_ff = int(opts["top_k"]), int(opts["d_model"]), int(opts["d_ff"])
    device, dtype = torch.device("cuda"), torch.bfloat16

    def make(num_tokens, num_experts, dtype=dtype):
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda *shape, scale: (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
        return [rand(num_tokens, d_model, scale=1.0), rand(num_experts, d_model, scale=d_model ** -0.5),
                rand(num_experts, d_ff, d_model, scale=d_model ** -0.5),
                rand(num_experts, d_ff, d_model, scale=d_model ** -0.5),
                rand(num_experts, d_model, d_ff, scale=d_ff ** -0.5)]

    def forward_and_grads(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y, _ = fn(*leaves, top_k)
        y.float().square().sum().backward()
        return [y.detach(), *(t.grad for t in leaves)]

    # correctness on the GPU first: bf16 Triton and bf16 loop, both against the loop in fp32
    inputs = make(2048, 8)
    exact = forward_and_grads(moe.moe_ffn_reference, [t.float() for t in inputs])
    print("check (T=2048, E=8, bf16): max |error| / max |exact|, Triton vs per-expert loop")
    for name, e, tri, ref in zip(["y", "dx", "drouter", "dw1", "dw3", "dw2"], exact,
                                 forward_and_grads(moe.moe_ffn_triton, inputs),
                                 forward_and_grads(moe.moe_ffn_reference, inputs)):
        scale = e.abs().max().item()
        err_tri, err_ref = [(t.float() - e).abs().max().item() / scale for t in (tri, ref)]
        print(f"  {name:8s} triton {err_tri:.2e}  loop {err_ref:.2e}{'' if err_tri <= 2 * err_ref + 1e-2 else '  <-- TOO LARGE'}")

    def timings(fn, inputs):
        """(forward ms under no_grad, forward + backward ms) of fn(*inputs)."""
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grad_y = torch.randn_like(inputs[0])

        def forward_backward():
            for t in leaves:
                t.grad = None
            fn(*leaves)[0].backward(grad_y)

        with torch.no_grad():
            forward_ms = time_ms(lambda: fn(*leaves))
        return forward_ms, time_ms(forward_backward)

    print(f"\nbf16, top-{top_k}, d_model {d_model}, d_ff {d_ff} per expert; dense = SwiGLU with d_ff {top_k * d_ff}")
    print("| E | tokens | pass | Triton tok/s | loop tok/s | dense tok/s | Triton / loop | Triton / dense | Triton TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for num_experts in expert_counts:
        for num_tokens in token_counts:
            x, router, w1, w3, w2 = make(num_tokens, num_experts)
            dense_w1, dense_w3 = (torch.randn(top_k * d_ff, d_model, device=device, dtype=dtype) for _ in "13")
            dense_w2 = torch.randn(d_model, top_k * d_ff, device=device, dtype=dtype)
            results = {
                "triton": timings(lambda *a: moe.moe_ffn_triton(*a, top_k), [x, router, w1, w3, w2]),
                "loop": timings(lambda *a: moe.moe_ffn_reference(*a, top_k), [x, router, w1, w3, w2]),
                "dense": timings(lambda *a: (moe.swiglu(*a),), [x, dense_w1, dense_w3, dense_w2]),
            }
            active_flop = 2 * 3 * num_tokens * top_k * d_model * d_ff  # forward; backward is 2x that
            for pass_index, (pass_name, flop) in enumerate([("fwd", active_flop), ("fwd+bwd", 3 * active_flop)]):
                tri, loop, dns = (results[k][pass_index] for k in ("triton", "loop", "dense"))
                print(f"| {num_experts} | {num_tokens} | {pass_name} | {num_tokens / tri * 1e3:,.0f} | "
                      f"{num_tokens / loop * 1e3:,.0f} | {num_tokens / dns * 1e3:,.0f} | {loop / tri:.2f}x | "
                      f"{dns / tri:.2f}x | {flop / tri / 1e9:.0f} |", flush=True)
            del x, router, w1, w3, w2, dense_w1, dense_w3, dense_w2
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}; goal: Triton / loop >= 3x at E=64, Triton / dense >= 0.6x")


def main():
    benches = {"attention": bench_attention, "moe": bench_moe}
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        raise SystemExit(f"usage: python kernels/bench.py {{{'|'.join(benches)}}} [options]")
    if not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py needs a CUDA GPU (the CPU interpreter is for correctness only)")
    benches[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
