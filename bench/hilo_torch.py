r"""PyTorch layers of the HiLo benches (torch only, no jax): LITv2's HiLo, PVT's
spatial-reduction attention (SRA) and local window attention, and a timing worker.

`make_layer(kind, ...)` builds one layer (`torch.nn.Module`, forward x [B, H*W, C] ->
[B, H*W, C], eager, explicit attention as the authors' code):
  hilo    LITv2's HiLo (Pan et al., NeurIPS 2022, github.com/ziplab/LITv2): Hi-Fi heads
          attend inside ws x ws windows, Lo-Fi heads attend to ws x ws average-pooled
          keys/values; h_qkv, h_proj, l_q, l_kv, l_proj
  sra     PVT's spatial-reduction attention (PVTv1/v2): q Linear on every token; keys and
          values from the map reduced by a Conv2d(kernel = stride = sr_ratio) + LayerNorm,
          then a kv Linear; every head attends to all (H/sr)(W/sr) reduced tokens; proj
  window  local window attention (Swin's W-MSA without relative position bias or shift):
          qkv Linear, every head attends inside its window x window window, proj

bench/hilo_gpu.py times `hilo` on the card; bench/hilo_cpu.py runs this file as a worker
under a Python with torch (`--torch_python`):

  python bench/hilo_torch.py '{"batch": 64, "side": 14, "dim": 384, "heads": 12,
      "window_size": 2, "alpha": 0.9, "sr_ratio": 2, "window": 7, "repeats": 5,
      "kinds": ["hilo", "sra", "window"]}'

prints one JSON line {kind: median seconds} (float32, torch.no_grad, this process's
default intra-op threads).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import nn


class HiLo(nn.Module):
  """LITv2's HiLo layer (the paper's code, explicit attention)."""

  def __init__(self, dim: int, heads: int, height: int, width: int, ws: int, alpha: float):
    super().__init__()
    self.height, self.width, self.ws = height, width, ws
    self.hd = dim // heads
    self.l_heads = heads if ws == 1 else int(heads * alpha)
    self.h_heads = heads - self.l_heads
    self.l_dim, self.h_dim = self.l_heads * self.hd, self.h_heads * self.hd
    self.scale = self.hd**-0.5
    if self.l_heads:
      self.sr = nn.AvgPool2d(ws, ws) if ws > 1 else None
      self.l_q = nn.Linear(dim, self.l_dim)
      self.l_kv = nn.Linear(dim, 2 * self.l_dim)
      self.l_proj = nn.Linear(self.l_dim, self.l_dim)
    if self.h_heads:
      self.h_qkv = nn.Linear(dim, 3 * self.h_dim)
      self.h_proj = nn.Linear(self.h_dim, self.h_dim)

  def hifi(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
    b, h, w, _ = x.shape
    ws = self.ws
    hg, wg = h // ws, w // ws
    x = x.reshape(b, hg, ws, wg, ws, -1).transpose(2, 3)
    qkv = self.h_qkv(x).reshape(b, hg * wg, -1, 3, self.h_heads, self.hd)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    x = (attn @ v).transpose(2, 3).reshape(b, hg, wg, ws, ws, self.h_dim)
    return self.h_proj(x.transpose(2, 3).reshape(b, h, w, self.h_dim))

  def lofi(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
    b, h, w, c = x.shape
    q = self.l_q(x).reshape(b, h * w, self.l_heads, self.hd).permute(0, 2, 1, 3)
    if self.sr is not None:
      x = self.sr(x.permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    kv = self.l_kv(x).reshape(b, -1, 2, self.l_heads, self.hd).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.l_proj((attn @ kv[1]).transpose(1, 2).reshape(b, h, w, self.l_dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
    b, n, c = x.shape
    x = x.reshape(b, self.height, self.width, c)
    branches = ((self.hifi, self.h_heads), (self.lofi, self.l_heads))
    outs = [f(x) for f, n_heads in branches if n_heads]
    return torch.cat(outs, dim=-1).reshape(b, n, c)


class SRA(nn.Module):
  """PVT's spatial-reduction attention: keys/values from a strided-conv-reduced map."""

  def __init__(self, dim: int, heads: int, height: int, width: int, sr_ratio: int):
    super().__init__()
    self.height, self.width, self.heads = height, width, heads
    self.scale = (dim // heads) ** -0.5
    self.q = nn.Linear(dim, dim)
    self.kv = nn.Linear(dim, 2 * dim)
    self.proj = nn.Linear(dim, dim)
    self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio) if sr_ratio > 1 else None
    self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
    b, n, c = x.shape
    q = self.q(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
    if self.sr is not None:
      x_ = x.permute(0, 2, 1).reshape(b, c, self.height, self.width)
      x = self.norm(self.sr(x_).reshape(b, c, -1).permute(0, 2, 1))  # [B, M, C]
    kv = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))


class WindowAttention(nn.Module):
  """Local window attention (W-MSA without relative position bias)."""

  def __init__(self, dim: int, heads: int, height: int, width: int, window: int):
    super().__init__()
    self.height, self.width, self.heads, self.window = height, width, heads, window
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
    b, n, c = x.shape
    w, hg, wg = self.window, self.height // self.window, self.width // self.window
    x = x.reshape(b, hg, w, wg, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    qkv = self.qkv(x).reshape(x.shape[0], w * w, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B * windows, heads, w*w, hd]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    x = self.proj((attn @ v).transpose(1, 2).reshape(-1, w * w, c))
    return x.reshape(b, hg, wg, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)


def make_layer(kind: str, *, dim: int, heads: int, height: int, width: int, **options) -> nn.Module:
  """One layer of the module docstring; options: window_size, alpha (hilo), sr_ratio
  (sra), window (window)."""
  if kind == "hilo":
    return HiLo(dim, heads, height, width, options["window_size"], options["alpha"])
  if kind == "sra":
    return SRA(dim, heads, height, width, options["sr_ratio"])
  if kind == "window":
    return WindowAttention(dim, heads, height, width, options["window"])
  raise ValueError(f"unknown layer kind {kind!r}")


def median_seconds(fn, x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
  """Median wall time of fn(x) under torch.no_grad (CPU)."""
  with torch.no_grad():
    for _ in range(warmup):
      fn(x)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn(x)
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(spec: dict) -> dict[str, float]:
  side, dim = spec["side"], spec["dim"]
  torch.manual_seed(0)
  x = torch.randn(spec["batch"], side * side, dim)
  options = {k: spec[k] for k in ("window_size", "alpha", "sr_ratio", "window")}
  out = {}
  for kind in spec["kinds"]:
    layer = make_layer(kind, dim=dim, heads=spec["heads"], height=side, width=side, **options)
    out[kind] = median_seconds(layer.eval(), x, spec["repeats"])
  return out


if __name__ == "__main__":
  print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
