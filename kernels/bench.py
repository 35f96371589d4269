"""Benchmark tables for kernels/ (a script, not a test). Needs a CUDA GPU.

    python kernels/bench.py all --quick   # the one-call check (< 8 min on an H100 / H200, compile included)
    python kernels/bench.py attention     # full sweep: n=512,...,16384 d=64,128 causal=both naive_max_n=4096
    python kernels/bench.py moe           # full sweep: tokens=4096,16384 experts=8,64 top_k=2 d_model d_ff

`all --quick` prints the torch / triton / GPU versions; checks correctness first, on the GPU, only for
the variants it then times (exit status 1 on a failed check); prints the attention table (bf16, D = 128,
N = 2048 and 8192, causal: TFLOP/s of fwd, bwd and fwd+bwd next to SDPA's flash backend), the memory
per token, the MoE table (T = 16384, E = 8 and 64, top-2: Triton vs the per-expert loop vs a dense
SwiGLU of the same active FLOPs, with peak memory), checks that MoE routing and dispatch run under
torch.cuda.set_sync_debug_mode("error") (no host sync), and ends with the goal line
(attention fwd >= 1.0x SDPA, fwd+bwd >= 0.8x; MoE >= 3x the loop at E = 64 and >= 0.6x dense).
Options are key=value (the `--` prefix is optional); `all` takes the options of both benches.
"""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a script run from anywhere

ATTENTION_OPTIONS = dict(n="512,1024,2048,4096,8192,16384", d="64,128", causal="both", naive_max_n="4096")
MOE_OPTIONS = dict(tokens="4096,16384", experts="8,64", top_k="2", d_model="1024", d_ff="2816")
QUICK = dict(n="2048,8192", d="128", causal="true", naive_max_n="0", tokens="16384", experts="8,64")
BENCHES = ("all", "attention", "moe")
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
ATTENTION_TOKENS, ATTENTION_WIDTH = 16384, 2048  # tokens per step (batch = tokens // N), heads * D


def parse_args(argv):
    """argv (without the program name) -> (bench name, options dict of strings). SystemExit on bad input."""
    usage = f"usage: python kernels/bench.py {{{'|'.join(BENCHES)}}} [--quick] [key=value ...]"
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(usage)
    bench, quick = argv[0], "--quick" in argv[1:]
    known = {"attention": ATTENTION_OPTIONS, "moe": MOE_OPTIONS, "all": {**ATTENTION_OPTIONS,
                                                                         **MOE_OPTIONS}}[bench]
    opts = {**known, **({k: v for k, v in QUICK.items() if k in known} if quick else {})}
    for arg in argv[1:]:
        if arg == "--quick":
            continue
        key, sep, value = arg.lstrip("-").partition("=")
        if key not in known or not sep:
            raise SystemExit(f"bench {bench}: unknown option {arg!r} (known: --quick, "
                             f"{', '.join(k + '=' for k in known)})\n{usage}")
        opts[key] = value
    if opts.get("causal", "both") not in ("both", "true", "false"):
        raise SystemExit(f"bench {bench}: causal={opts['causal']!r}: expected both, true or false")
    for key in ("n", "d", "naive_max_n", "tokens", "experts", "top_k", "d_model", "d_ff"):
        if key in opts and not all(v.strip().isdigit() for v in opts[key].split(",")):
            raise SystemExit(f"bench {bench}: {key}={opts[key]!r}: expected comma-separated whole numbers")
    return bench, opts


def ints(text):
    return [int(v) for v in text.split(",")]


def time_ms(fn, warmup=3, iters=10):
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


def peak_mib(fn, *args):
    """Peak CUDA memory (MiB) that fn(*args) allocates above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def max_error(got, exact):
    return (got.float() - exact.float()).abs().max().item()


class Report:
    """Correctness failures (exit status) and goal results (the last line)."""

    def __init__(self):
        self.failures, self.goals = [], []

    def check(self, ok, label):
        if not ok:
            self.failures.append(label)
        return "" if ok else "  <-- FAILED"

    def goal(self, label, ratio, target):
        self.goals.append((label, ratio, target))

    def finish(self):
        parts = [f"{label} {'-' if r is None else f'{r:.2f}x'} (goal {t}x) "
                 f"{'met' if r and r >= t else 'MISSED'}"
                 for label, r, t in self.goals]
        met = sum(1 for _, r, t in self.goals if r and r >= t)
        print(f"\nGOALS {met}/{len(self.goals)} met: " + "; ".join(parts))
        if self.failures:
            print(f"FAILED CHECKS ({len(self.failures)}): " + "; ".join(self.failures))
            raise SystemExit(1)


# ----------------------------------------------------------------------------- attention

def bench_attention(opts, report):
    """Flash attention: correctness of each timed variant, TFLOP/s of fwd, bwd and fwd+bwd for the Triton
    kernels, SDPA's flash backend and (N <= naive_max_n) a naive bf16 version that materialises the scores,
    at 16k tokens per step (batch = 16384 // N, heads = 2048 // D, like FlashAttention-2's benchmark);
    then the peak memory of one causal fwd+bwd at batch 1."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import attention, attention_reference

    seq_lens, head_dims, naive_max_n = ints(opts["n"]), ints(opts["d"]), int(opts["naive_max_n"])
    causal_modes = {"both": [False, True], "true": [True], "false": [False]}[opts["causal"]]
    os.environ["KERNELS"] = "triton"  # `attention` runs the kernels (the default on CUDA, made explicit)
    device, tokens, width = DEVICE, ATTENTION_TOKENS, ATTENTION_WIDTH

    def sdpa_flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    providers = {"triton": lambda q, k, v, causal: attention(q, k, v, causal=causal), "sdpa": sdpa_flash,
                 "naive": lambda q, k, v, causal: attention_reference(q, k, v, causal=causal, upcast=False)}

    def make(batch, heads, n, d, dtype=DTYPE):
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda: torch.randn(batch, heads, n, d, generator=gen, device=device, dtype=dtype)
        q, k, v = (rand().requires_grad_() for _ in "qkv")
        return q, k, v, rand()

    # correctness first, on the variants timed below: one untimed fwd+bwd at the timed shape autotunes the
    # tiles, then batch 1 x 2 heads (same tuning key, so the same tiles; small enough for the fp32
    # reference) is checked with flash-attn's rule, |Triton - fp32| <= 2 |same-dtype naive - fp32| + atol
    print("check: max |error| vs the fp32 reference, Triton (same-dtype naive); bound 2x naive + 2e-2")
    for d in head_dims:
        for causal in causal_modes:
            for n in seq_lens:
                q, k, v, grad_out = make(max(1, tokens // n), width // d, n, d)
                torch.autograd.grad(attention(q, k, v, causal=causal), (q, k, v), grad_out)  # tunes the tiles
                q, k, v, grad_out = make(1, 2, n, d)
                results = {}
                for name, fn, extra in [("exact", attention_reference, {}), ("triton", attention, {}),
                                        ("naive", attention_reference, {"upcast": False})]:
                    out = fn(q, k, v, causal=causal, **extra)
                    results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
                line = []
                for i, name in enumerate(["out", "dq", "dk", "dv"]):
                    err, err_naive = (max_error(results[p][i], results["exact"][i]) for p in ("triton",
                                                                                              "naive"))
                    flag = report.check(err <= 2 * err_naive + 2e-2,
                                        f"attention N{n} D{d} causal={causal} {name}")
                    line.append(f"{name} {err:.1e} ({err_naive:.1e}){flag}")
                print(f"  {DTYPE_NAME} N{n} D{d} causal={causal}: " + ", ".join(line), flush=True)
                del q, k, v, grad_out, results
                torch.cuda.empty_cache()

    def forward_backward(fn, q, k, v, grad_out):
        return torch.autograd.grad(fn(q, k, v, True), (q, k, v), grad_out)

    def timings(fn, q, k, v, grad_out, causal):
        """Milliseconds of (fwd under no_grad, bwd alone, fwd+bwd) of fn."""
        with torch.no_grad():
            fwd = time_ms(lambda: fn(q, k, v, causal))
        out = fn(q, k, v, causal)
        bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True))
        both = time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad_out))
        return fwd, bwd, both

    print(f"\nTFLOP/s, {DTYPE_NAME}, {tokens} tokens per step (batch = {tokens} // N), heads = {width} // D; "
          "FLOPs: fwd 4*B*H*N^2*D (half if causal), bwd 2.5x fwd")
    print("| D | causal | N | pass | Triton | SDPA flash | naive | Triton speed / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {"fwd": [], "fwd+bwd": []}
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
                    ratio = (results["sdpa"][i] / results["triton"][i]
                             if results.get("sdpa") and results.get("triton") else None)
                    if pass_name in ratios and causal and d == 128:
                        ratios[pass_name].append(ratio)
                    print(f"| {d} | {causal} | {n} | {pass_name} | {tflops['triton']} | {tflops['sdpa']} | "
                          f"{tflops['naive']} | {'-' if ratio is None else f'{ratio:.2f}x'} |", flush=True)
                del q, k, v, grad_out
                torch.cuda.empty_cache()
    for pass_name, target in [("fwd", 1.0), ("fwd+bwd", 0.8)]:
        found = [r for r in ratios[pass_name] if r is not None]
        report.goal(f"attention {pass_name} / SDPA (worst, D=128 causal)", min(found) if found else None,
                    target)

    print(f"\npeak memory of one causal fwd+bwd above the inputs, {DTYPE_NAME}, batch 1, "
          f"heads = {width} // D")
    print("| D | N | Triton MiB | SDPA flash MiB | naive MiB | Triton KiB per token | SDPA KiB per token |")
    print("|---|---|---|---|---|---|---|")
    for d in head_dims:
        for n in seq_lens:
            q, k, v, grad_out = make(1, width // d, n, d)
            peaks = {}
            for name, fn in providers.items():
                if name == "naive" and n > naive_max_n:
                    peaks[name] = "skipped"
                    continue
                try:
                    peaks[name] = peak_mib(forward_backward, fn, q, k, v, grad_out)
                except torch.cuda.OutOfMemoryError:
                    peaks[name] = "OOM"
                torch.cuda.empty_cache()
            show = lambda x: x if isinstance(x, str) else f"{x:.1f}"
            kib_per_token = ["-" if isinstance(peaks[p],
                                               str) else f"{peaks[p] * 1024 / n:.1f}" for p in ("triton",
                                                                                                "sdpa")]
            print(f"| {d} | {n} | {show(peaks['triton'])} | {show(peaks['sdpa'])} | {show(peaks['naive'])} | "
                  f"{kib_per_token[0]} | {kib_per_token[1]} |", flush=True)
            del q, k, v, grad_out

    attention_module = importlib.import_module("kernels.attention")
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        print(f"last autotuned config of {kernel}: {getattr(attention_module, kernel).best_config}")


# ----------------------------------------------------------------------------- MoE

def bench_moe(opts, report):
    """MoE SwiGLU FFN, bf16, top-k: correctness of each timed size, then Triton vs the per-expert loop vs a
    dense SwiGLU of the same active FLOPs (d_ff = k * F, no router): tokens/s, TFLOP/s and peak memory; and
    the no-host-sync check of routing + dispatch + the Triton forward."""
    from kernels import moe

    token_counts, expert_counts = ints(opts["tokens"]), ints(opts["experts"])
    top_k, d_model, d_ff = int(opts["top_k"]), int(opts["d_model"]), int(opts["d_ff"])
    device, dtype = DEVICE, DTYPE

    def make(num_tokens, num_experts):
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

    print(f"\ncheck ({DTYPE_NAME}, top-{top_k}): max |error| / max |exact| vs the fp32 loop, "
          f"Triton ({DTYPE_NAME} loop); "
          "bound 2x loop + 1e-2")
    for num_experts in expert_counts:
        for num_tokens in token_counts:
            inputs = make(num_tokens, num_experts)
            exact = forward_and_grads(moe.moe_ffn_reference, [t.float() for t in inputs])
            line = []
            for name, e, tri, ref in zip(["y", "dx", "drouter", "dw1", "dw3", "dw2"], exact,
                                         forward_and_grads(moe.moe_ffn_triton, inputs),
                                         forward_and_grads(moe.moe_ffn_reference, inputs)):
                scale = e.abs().max().item()
                err, err_ref = (max_error(t, e) / scale for t in (tri, ref))
                flag = report.check(err <= 2 * err_ref + 1e-2, f"moe T{num_tokens} E{num_experts} {name}")
                line.append(f"{name} {err:.1e} ({err_ref:.1e}){flag}")
            runs = [forward_and_grads(moe.moe_ffn_triton, inputs) for _ in range(2)]
            same = all(map(torch.equal, *runs))
            flag = report.check(same, f"moe T{num_tokens} E{num_experts} repeat")
            line.append(f"bitwise repeatable {same}{flag}")
            print(f"  T{num_tokens} E{num_experts}: " + ", ".join(line), flush=True)
            del inputs, exact, runs
            torch.cuda.empty_cache()

    # routing, dispatch plan and the whole Triton forward may not synchronise with the host (tuned above)
    x, router, w1, w3, w2 = make(token_counts[-1], expert_counts[-1])
    try:
        with torch.no_grad():
            torch.cuda.set_sync_debug_mode("error")
            try:
                gates, expert_idx, _ = moe.route(moe.router_logits(x, router), top_k)
                moe.plan_dispatch(expert_idx, router.shape[0], moe.BLOCK_M)
                moe.moe_ffn_triton(x, router, w1, w3, w2, top_k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        sync_note = "none (ran under torch.cuda.set_sync_debug_mode('error'))"
    except RuntimeError as error:
        sync_note = f"FOUND: {str(error).splitlines()[0]}"
        report.check(False, "moe routing host sync")
    print(f"host syncs in MoE routing + dispatch + Triton forward: {sync_note}")
    del x, router, w1, w3, w2

    def timings(fn, inputs):
        """(forward ms under no_grad, forward + backward ms,
        peak MiB of forward + backward) of fn(*inputs)."""
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grad_y = torch.randn_like(inputs[0])

        def forward_backward():
            for t in leaves:
                t.grad = None
            fn(*leaves)[0].backward(grad_y)

        with torch.no_grad():
            forward_ms = time_ms(lambda: fn(*leaves))
        return forward_ms, time_ms(forward_backward), peak_mib(forward_backward)

    print(f"\n{DTYPE_NAME}, top-{top_k}, d_model {d_model}, d_ff {d_ff} per expert; dense = SwiGLU with "
          f"d_ff {top_k * d_ff} "
          "(same active FLOPs); peak = MiB above the inputs during fwd+bwd")
    print("| E | tokens | pass | Triton tok/s | loop tok/s | dense tok/s | Triton / loop | Triton / dense "
          "| Triton TFLOP/s | peak MiB Triton / loop / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for num_experts in expert_counts:
        for num_tokens in token_counts:
            x, router, w1, w3, w2 = make(num_tokens, num_experts)
            dense = [torch.randn(top_k * d_ff, d_model, device=device,
                                 dtype=dtype) * d_model ** -0.5 for _ in "13"]
            dense.append(torch.randn(d_model, top_k * d_ff, device=device,
                                     dtype=dtype) * (top_k * d_ff) ** -0.5)
            results = {
                "triton": timings(lambda *a: moe.moe_ffn_triton(*a, top_k), [x, router, w1, w3, w2]),
                "loop": timings(lambda *a: moe.moe_ffn_reference(*a, top_k), [x, router, w1, w3, w2]),
                "dense": timings(lambda *a: (moe.swiglu(*a),), [x, *dense]),
            }
            peaks = " / ".join(f"{results[k][2]:.0f}" for k in ("triton", "loop", "dense"))
            active_flop = 2 * 3 * num_tokens * top_k * d_model * d_ff  # forward; backward is 2x that
            for pass_index, (pass_name, flop) in enumerate([("fwd", active_flop), ("fwd+bwd",
                                                                                   3 * active_flop)]):
                tri, loop, dns = (results[k][pass_index] for k in ("triton", "loop", "dense"))
                print(f"| {num_experts} | {num_tokens} | {pass_name} | {num_tokens / tri * 1e3:,.0f} | "
                      f"{num_tokens / loop * 1e3:,.0f} | {num_tokens / dns * 1e3:,.0f} | {loop / tri:.2f}x | "
                      f"{dns / tri:.2f}x | {flop / tri / 1e9:.0f} | {peaks} |", flush=True)
                largest = num_experts == max(expert_counts) and num_tokens == max(token_counts)
                if pass_name == "fwd+bwd" and largest:
                    report.goal(f"MoE fwd+bwd / loop (E={num_experts}, T={num_tokens})", loop / tri, 3.0)
                    report.goal(f"MoE fwd+bwd / dense (E={num_experts}, T={num_tokens})", dns / tri, 0.6)
            del x, router, w1, w3, w2, dense
            torch.cuda.empty_cache()


def print_versions():
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
          f"GPU {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
          f"{props.multi_processor_count} SMs)", flush=True)


def main(argv=None):
    bench, opts = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py needs a CUDA GPU (the CPU interpreter is for correctness only)")
    print_versions()
    report = Report()
    if bench in ("all", "attention"):
        bench_attention(opts, report)
    if bench in ("all", "moe"):
        bench_moe(opts, report)
    report.finish()


if __name__ == "__main__":
    main()
