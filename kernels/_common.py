"""What kernels/attention.py and kernels/moe.py share: the Triton import, the KERNELS= switch, the dtype
rules of the Triton path, the autotuning keys and the boundary mask of a tile.

Dispatch (both ops): KERNELS=triton forces the kernels, KERNELS=ref the PyTorch path; unset, CUDA tensors
of a dtype the kernels take (fp16 / bf16 / fp32) run the kernels and everything else (CPU, MPS, fp64 on
CUDA) runs the PyTorch path. The value is read at every call, case-insensitively, and anything else is
a ValueError naming it.

Autotuning: each kernel is tuned once per power-of-two bucket of its lengths (1000 and 1024 share a
config, 1025 starts the next bucket), so generation does not re-tune at every new length; 16 query rows
or fewer (decoding) take one fixed small tile without timing anything; under torch.distributed with
more than one rank nothing is timed either and every rank takes the first config of the list, so no
two ranks run different tiles (timings differ per rank, and so would the summation order).
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # runtime installs need only torch: the PyTorch paths work, no kernel is launched
    from types import SimpleNamespace

    HAS_TRITON = False  # a stand-in just rich enough for the kernel definitions to be parsed
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **_: lambda fn: fn,
                             Config=lambda *a, **k: None, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = SimpleNamespace(constexpr=lambda value=None: value)

# read once, as triton decides at its import whether @triton.jit compiles or interprets
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_PATHS = ("triton", "ref")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_ROWS = 16  # at most this many query rows: one fixed small tile, no tuning


def forced_path():
    """'' (dispatch by device and dtype), 'triton' or 'ref', from the KERNELS environment variable."""
    value = os.environ.get("KERNELS", "").strip().lower()
    if value and value not in KERNEL_PATHS:
        raise ValueError(f"KERNELS={value!r}: expected one of {', '.join(KERNEL_PATHS)} (or unset)")
    return value


def check_triton_can_run(op, x):
    """Raise with a one-line reason when the Triton path cannot run on tensor x (dtype and device)."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: the Triton path needs `pip install triton` (or unset KERNELS)")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(f"{op}: Triton on CPU tensors needs TRITON_INTERPRET=1 set before importing "
                           "triton")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: the Triton kernels take fp16 / bf16 / fp32, got {x.dtype} "
                         "(KERNELS=ref takes any dtype)")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ValueError(f"{op}: the Triton interpreter cannot run bf16 (it would multiply the bit "
                         "patterns as integers); use fp16 / fp32 on CPU, bf16 on a GPU")


def use_triton(op, x, kernels_fit=True):
    """Whether `op` runs its Triton kernels on x. Forced (KERNELS=triton): always, after checking that they
    can; by default: CUDA tensors of a kernel dtype, when kernels_fit (the op's own shape limits)."""
    path = forced_path()
    if path == "ref":
        return False
    if path == "triton":
        check_triton_can_run(op, x)
        return True
    return HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES and kernels_fit


def length_bucket(n):
    """The power of two >= n that stands for n in the autotuning keys (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _more_than_one_rank():
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def prune_configs(configs, n_rows, decode_config=None):
    """The configs an autotuner may time for a launch over n_rows query rows (see the module docstring)."""
    if decode_config is not None and len(configs) > 1:  # the interpreter's one-config list stays whole
        if n_rows <= DECODE_ROWS:
            return [decode_config]
        configs = [c for c in configs if c is not decode_config]
    return configs[:1] if _more_than_one_rank() else configs


@triton.jit
def tile_mask(rows, n_rows, cols, n_cols, CHECK_COLS: tl.constexpr):
    """(len(rows), len(cols)) mask of the in-bounds elements of a row-major tile. CHECK_COLS=False leaves
    the column test out (the columns are known to fit), so loads along a row stay vectorised."""
    mask = rows[:, None] < n_rows
    if CHECK_COLS:
        mask = mask & (cols[None, :] < n_cols)
    return mask
