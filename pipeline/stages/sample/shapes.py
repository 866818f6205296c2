"""Noise and anti-aliased shape helpers shared by the planner and the renderer."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SS = 2  # supersampling of car and tree patches (anti-aliased edges)


def _fbm(rng: np.random.Generator, shape: tuple[int, int], scales_px: list[float],
         weights: list[float]) -> np.ndarray:
    """Multi-scale value noise (zero mean, about unit std): coarse grids upsampled smoothly."""
    rows, cols = shape
    out = np.zeros(shape, np.float32)
    for scale, weight in zip(scales_px, weights, strict=True):
        if scale <= 1.0:
            out += weight * rng.standard_normal(shape).astype(np.float32)
            continue
        gr, gc = int(rows / scale) + 3, int(cols / scale) + 3
        grid = rng.standard_normal((gr, gc)).astype(np.float32)
        # Bilinear upsampling of several octaves looks smooth and is 4x cheaper than cubic.
        up = ndimage.zoom(grid, scale, order=1, mode="nearest", grid_mode=False)
        out += weight * up[:rows, :cols] / 0.8
    return out


def _coverage(sdf: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf / soft, 0.0, 1.0)


def _box_sdf(s: np.ndarray, t: np.ndarray, hl: float, hw: float, r: float) -> np.ndarray:
    """Signed distance to a rounded rectangle of half sizes hl, hw and corner radius r."""
    qx = np.abs(s) - hl + r
    qy = np.abs(t) - hw + r
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _band(x: np.ndarray, lo: float, hi: float, soft: float) -> np.ndarray:
    """Soft indicator of lo <= x <= hi."""
    return np.clip((x - lo) / soft + 0.5, 0, 1) * np.clip((hi - x) / soft + 0.5, 0, 1)


def _pick(rng: np.random.Generator, table: list) -> tuple:
    shares = np.array([row[1] for row in table], float)
    return table[int(rng.choice(len(table), p=shares / shares.sum()))]


def _patch(cx: float, cy: float, radius: float, shape: tuple[int, int]):
    """Pixel bounds of a square patch around (cx, cy), clipped to the image; None if empty."""
    r0, r1 = max(0, int(cy - radius)), min(shape[0], int(cy + radius) + 2)
    c0, c1 = max(0, int(cx - radius)), min(shape[1], int(cx + radius) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _ss_grid(r0: int, r1: int, c0: int, c1: int, ss: int = SS):
    """Supersampled sample positions (x, y) of a patch, in continuous pixel coordinates."""
    ys = r0 + (np.arange((r1 - r0) * ss) + 0.5) / ss
    xs = c0 + (np.arange((c1 - c0) * ss) + 0.5) / ss
    return np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))


def _pool(a: np.ndarray, ss: int = SS) -> np.ndarray:
    """Average ss x ss blocks of the last two axes (supersampled -> pixel)."""
    if ss == 1:
        return a
    out = a[..., 0::ss, 0::ss].copy()
    for i in range(ss):
        for j in range(ss):
            if i or j:
                out += a[..., i::ss, j::ss]
    return out / (ss * ss)

