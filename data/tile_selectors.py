"""Tile-grid selectors of two anchors, written from their published descriptions (learned, not copied),
for mm15.py's comparison with MM1.5's rule (mm15.plan_tiles). Grids are (rows, cols) of square tiles of
`cfg.tile_size` pixels with cfg.n_min <= rows * cols <= cfg.n_max, the same candidates for all three.

- LLaVA-NeXT `select_best_resolution` (llava/mm_utils.py): the resolution with the most effective pixels
  (the aspect-kept resize, never counted above the original's), ties to the least wasted; the image is
  padded, and a base image (the whole image in one tile) always comes first.
- InternVL `dynamic_preprocess`: the grid of the closest aspect ratio (candidates in order of tile count),
  a tie goes to the later grid when the image has over half its pixels; the image is stretched to the
  grid, a thumbnail comes last when there is more than one tile.
"""
from __future__ import annotations


def grids(n_min: int, n_max: int) -> list[tuple[int, int]]:
    """(rows, cols) with n_min <= rows * cols <= n_max."""
    return [(rows, cols) for rows in range(1, n_max + 1) for cols in range(1, n_max + 1)
            if n_min <= rows * cols <= n_max]


def llava_next_grid(width: int, height: int, cfg) -> tuple:
    """LLaVA-NeXT's select_best_resolution -> (rows, cols)."""
    best, best_key = None, None
    for rows, cols in grids(cfg.n_min, cfg.n_max):
        w, h = cols * cfg.tile_size, rows * cfg.tile_size
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        if best is None or (effective, -(w * h - effective)) > best_key:
            best, best_key = (rows, cols), (effective, -(w * h - effective))
    return best


def internvl_grid(width: int, height: int, cfg) -> tuple:
    """InternVL's dynamic_preprocess -> (rows, cols)."""
    best, best_diff = (1, 1), float("inf")
    for rows, cols in sorted(grids(cfg.n_min, cfg.n_max), key=lambda g: (g[0] * g[1], g[1])):
        diff = abs(width / height - cols / rows)
        if diff < best_diff or diff == best_diff and width * height > 0.5 * cfg.tile_size ** 2 * rows * cols:
            best, best_diff = (rows, cols), min(diff, best_diff)
    return best


def selector_table(cfg, plan_tiles, fit) -> str:
    """Grid, image tokens and padded pixels of MM1.5's rule (mm15.plan_tiles, and its aspect-kept resize
    `fit`) and the two selectors here, for a fixed set of image shapes: the table mm15.py prints."""
    r, k = cfg.tile_size, cfg.image_tokens
    lines = [f"tiles of {r} px, {k} tokens each, {cfg.n_min} <= tiles <= {cfg.n_max}; padded = grid pixels "
             "not covered by the resized image (InternVL stretches: none, but the aspect changes)", "",
             "| W x H | MM1.5 grid | tokens | padded px | LLaVA-NeXT grid | tokens | padded px "
             "| InternVL grid | tokens | aspect change |", "|---" * 10 + "|"]
    for w, h in [(r, r), (2 * r, 2 * r), (r // 4, r // 4), (3 * r // 2, 2 * r), (9 * r // 8, 5 * r // 2),
                 (3 * r, 27 * r // 16), (r, 13 * r // 6), (r, 6 * r), (6 * r, r), (1, 5 * r), (7, 3)]:
        cells = [f"{w} x {h}"]
        plan = plan_tiles(w, h, cfg)
        for (rows, cols), views in ((plan["grid"], len(plan["order"])), (llava_next_grid(w, h, cfg), None)):
            (rw, rh), views = fit(w, h, cols * r, rows * r)[1], views or rows * cols + 1  # LLaVA: + base
            cells += [f"{rows}x{cols}", views * k, rows * cols * r * r - rw * rh]
        rows, cols = internvl_grid(w, h, cfg)
        cells += [f"{rows}x{cols}", (rows * cols + (rows * cols > 1)) * k, f"{cols / rows / (w / h):.2f}x"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
