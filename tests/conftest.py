"""Runs before any test module is imported: Triton must see TRITON_INTERPRET before its first import,
so the kernels run on CPU through the interpreter (CI exports it too; an explicit value wins)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# `import data`, `import kernels` (and the scripts, as modules) from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
