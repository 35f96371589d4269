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
    """Flash attention: TFLOP/s of fwd, bwd and fwd+bwd for the Triton kernels, torch SDPA (flash backend)
    and a naive bf16 version that materialises the scores, at 16k tokens per step (batch = 16384 // N,
    heads = 2048 // D, like FlashAttention-2's benchmark); then peak memory of fwd+bwd at batch 1.
    Options (key=value): n=512,1024,2048,4096,8192,16384 d=64,128 causal=both|true|false
    naive_max_n=4096 (the naive version is skipped above it: O(N^2) memory). First checks the Triton path
    against the fp32 reference on the GPU."""
    import importlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import attention, attention_reference

    opts = dict(n="512,1024,2048,4096,8192,16384", d="64,128", causal="both", naive_max_n="4096")
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts:
            raise SystemExit(f"bench attention: unknown option {key!r} (known: {', '.join(opts)})")
        opts[key] = value
    if opts["causal"] not in ("both", "true", "false"):
        raise SystemExit(f"bench attention: causal={opts['causal']!r}: expected both, true or false")
    seq_lens, head_dims = [[int(v) for v in opts[k].split(",")] for k in ("n", "d")]
    causal_modes = {"both": [False, True], "true": [True], "false": [False]}[opts["causal"]]
    naive_max_n = int(opts["naive_max_n"])
    os.environ["KERNELS"] = "triton"  # `attention` runs the kernels (the default on CUDA, made explicit)
    device = torch.device("cuda")

    def sdpa_flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    providers = {
        "triton": lambda q, k, v, causal: attention(q, k, v, causal=causal),
        "sdpa": sdpa_flash,
        "naive": lambda q, k, v, causal: attention_reference(q, k, v, causal=causal, upcast=False),
    }

    def make(batch, heads, n, d, dtype=torch.bfloat16, kv_heads=None):
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda h: torch.randn(batch, h, n, d, generator=gen, device=device, dtype=dtype).requires_grad_()
        q, k, v = rand(heads), rand(kv_heads or heads), rand(kv_heads or heads)
        return q, k, v, torch.randn(batch, heads, n, d, generator=gen, device=device, dtype=dtype)

    # correctness on the GPU first: flash-attn's rule, |Triton - fp32| <= 2 |same-dtype naive - fp32| + atol
    print("check: max |error| vs the fp32 reference, Triton and same-dtype naive (odd N, GQA, padded keys)")
    for dtype, n, d, causal, kv_heads, lengths in [(torch.bfloat16, 1000, 128, True, 2, None),
                                                   (torch.bfloat16, 777, 64, False, 8, [777, 300]),
                                                   (torch.float16, 333, 40, True, 4, [200, 0]),
                                                   (torch.float32, 257, 64, False, 8, None)]:
        q, k, v, grad_out = make(2, 8, n, d, dtype, kv_heads)
        kw = dict(causal=causal, key_lengths=None if lengths is None else torch.tensor(lengths, device=device))
        results = {}
        for name, fn, extra in [("exact", attention_reference, {}), ("triton", attention, {}),
                                ("naive", attention_reference, {"upcast": False})]:
            out = fn(q, k, v, **kw, **extra)
            results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        atol = 2e-2  # for fp32 the same-dtype error is ~0 and the kernels' matmuls run as TF32: atol decides
        line = []
        for i, name in enumerate(["out", "dq", "dk", "dv"]):
            err_tri, err_naive = [(results[p][i].float() - results["exact"][i].float()).abs().max().item()
                                  for p in ("triton", "naive")]
            flag = "" if err_tri <= 2 * err_naive + atol else " <-- TOO LARGE"
            line.append(f"{name} {err_tri:.1e} ({err_naive:.1e}){flag}")
        print(f"  {str(dtype)[6:]:8s} N{n} D{d} causal={causal} Hq/Hkv=8/{kv_heads} lengths={lengths}: " + ", ".join(line))

    def timings(fn, q, k, v, grad_out, causal):
        """Milliseconds of (fwd under no_grad, bwd alone, fwd+bwd) of fn."""
        with torch.no_grad():
            fwd = time_ms(lambda: fn(q, k, v, causal))
        out = fn(q, k, v, causal)
        bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True))
        both = time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad_out))
        return fwd, bwd, both

    tokens, width = 16384, 2048
    print(f"\nTFLOP/s, bf16, {tokens} tokens per step (batch = {tokens} // N), heads = {width} // D; "
          "FLOPs: fwd 4*B*H*N^2*D (half if causal), bwd 2.5x fwd")
    print("| D | causal | N | pass | Triton | SDPA flash | naive | Triton speed / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for d in head_dims:
        for causal in causal_modes:
            for n in seq_lens:
                batch, heads = max(1, tokens // n), width // d
                q, k, v, grad_out = make(batch, heads, n, d)
                fwd_flop = 4 * batch * heads * n * n * d * (0.5 if causal else 1.0)
                results = {}
                for name, fn in providers.items():
                    if name == "naive" and n > naive_max_n:
                        continue
                    try:
                        results[name] = timings(fn, q, k, v, grad_out, causal)
                    except torch.cuda.OutOfMemoryError:
                        results[name] = None
                    torch.cuda.empty_cache()
                for i, (pass_name, flop) in enumerate([("fwd", fwd_flop), ("bwd", 2.5 * fwd_flop),
                                                       ("fwd+bwd", 3.5 * fwd_flop)]):
                    tflops = {name: ("skipped" if name not in results else "OOM" if results[name] is None
                                     else f"{flop / results[name][i] / 1e9:.0f}") for name in providers}
                    ratio = (f"{results['sdpa'][i] / results['triton'][i]:.2f}x"
                             if results.get("sdpa") and results.get("triton") else "-")
                    print(f"| {d} | {causal} | {n} | {pass_name} | {tflops['triton']} | {tflops['sdpa']} | "
                          f"{tflops['naive']} | {ratio} |", flush=True)
                del q, k, v, grad_out
                torch.cuda.empty_cache()

    print(f"\npeak extra memory of one fwd+bwd (MiB above the inputs), bf16, batch 1, causal, heads = {width} // D")
    print("| D | N | Triton | SDPA flash | naive | Triton KiB per token |")
    print("|---|---|---|---|---|---|")
    for d in head_dims:
        for n in seq_lens:
            q, k, v, grad_out = make(1, width // d, n, d)
            peaks = {}
            for name, fn in providers.items():
                if name == "naive" and n > naive_max_n:
                    peaks[name] = "skipped"
                    continue
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    torch.autograd.grad(fn(q, k, v, True), (q, k, v), grad_out)
                    torch.cuda.synchronize()
                    peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                except torch.cuda.OutOfMemoryError:
                    peaks[name] = "OOM"
                torch.cuda.empty_cache()
            show = lambda x: x if isinstance(x, str) else f"{x:.1f}"
            per_token = "-" if isinstance(peaks["triton"], str) else f"{peaks['triton'] * 1024 / n:.1f}"
            print(f"| {d} | {n} | {show(peaks['triton'])} | {show(peaks['sdpa'])} | {show(peaks['naive'])} | "
                  f"{per_token} |", flush=True)
            del q, k, v, grad_out

    attention_module = importlib.import_module("kernels.attention")
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        print(f"last autotuned config of {kernel}: {getattr(attention_module, kernel).best_config}")
    print(f"\n{torch.cuda.get_device_name()}; goal (H100, D=128, causal, N >= 2k): fwd >= 1.0x SDPA and "
          ">= 450 TFLOP/s, fwd+bwd >= 0.8x SDPA; Triton memory per token flat in N (linear growth)")


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
    runs = [forward_and_grads(moe.moe_ffn_triton, inputs) for _ in range(2)]
    print("  bitwise identical across two runs (no atomics):", all(map(torch.equal, *runs)))

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
