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
    raise SystemExit("moe benchmark: being written (issue 4)")


def main():
    benches = {"attention": bench_attention, "moe": bench_moe}
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        raise SystemExit(f"usage: python kernels/bench.py {{{'|'.join(benches)}}} [options]")
    if not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py needs a CUDA GPU (the CPU interpreter is for correctness only)")
    benches[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
