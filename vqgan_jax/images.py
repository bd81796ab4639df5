"""Image grids for PNG files and TensorBoard."""

import numpy as np
from PIL import Image


def to_uint8(x):
  """[-1, 1] float images -> uint8 (clipped, as the original's scripts do)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncol: int, pad: int = 2, value: int = 255):
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, ncol*(W+pad)+pad, C) uint8 grid."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), value, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y : y + h, x : x + w] = img
  return grid


def interleave_rows(a, b, ncol: int):
  """Rows of `a` then the matching row of `b` (inputs above their reconstructions)."""
  rows = []
  for start in range(0, len(a), ncol):
    rows.append(a[start : start + ncol])
    rows.append(b[start : start + ncol])
  return np.concatenate(rows, axis=0)


def save_png(path, grid, scale: int = 1):
  img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)
