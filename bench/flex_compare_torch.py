r"""The PyTorch side of bench/flex_compare_cpu.py: FlexAttention on the same inputs.

Runs in a Python that has torch (and numpy), not jax; bench/flex_compare_cpu.py calls it
with a .npz of inputs and reads back a .npz of outputs. The five programmable cases are
written here as FlexAttention's `score_mod` / `mask_mod` (parameters captured as
tensors, as FlexAttention takes them), the same functions as bench/flex_compare_cpu.py
and tests/test_programmable.py take from sparse_attention.ops.score_mods.

  python bench/flex_compare_torch.py accuracy IN.npz OUT.npz
  python bench/flex_compare_torch.py timing IN.npz OUT.npz
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

SOFTCAP = 20.0  # score_mods.Softcap(20.0) on the jax side


def t5_bucket(relative, num_buckets=16, max_distance=64):
  """T5's bidirectional relative-position buckets: sparse_attention.ops.score_mods.t5_bucket
  in torch (bench/flex_compare_cpu.py checks the two agree)."""
  half = num_buckets // 2
  bucket = torch.where(relative > 0, half, 0)
  n = relative.abs()
  exact = half // 2
  log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
  large = exact + (log_ratio * (half - exact)).to(torch.int32)
  return bucket + torch.where(n < exact, n, large.clamp(max=half - 1))


def _mods(name: str, arrays: dict, window: int = 40):
  """(score_mod, mask_mod or None) of a case, parameters captured from `arrays`."""
  t = lambda key: torch.from_numpy(arrays[key])

  def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx

  def softcap(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)

  if name in ("softcap_causal", "causal"):
    return (softcap if name == "softcap_causal" else None), causal
  if name == "alibi_documents":
    slopes, seg = t("slopes"), t("segments")

    def alibi(score, b, h, q_idx, kv_idx):
      return score - slopes[h] * (q_idx - kv_idx).abs()

    def same_doc_causal(b, h, q_idx, kv_idx):
      return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    return alibi, same_doc_causal
  if name == "document":
    seg = t("segments")
    return None, lambda b, h, q_idx, kv_idx: (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)
  if name == "t5_bias_no_mask":
    table = t("table")

    def t5_bias(score, b, h, q_idx, kv_idx):
      return score + table[t5_bucket(kv_idx - q_idx), h]

    return t5_bias, None
  if name == "prefix_lm":
    prefix = t("prefix")
    return None, lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | (kv_idx < prefix[b])
  if name == "window40_predicate":
    return None, lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < 40)
  if name == "sliding":  # masks.sliding_window(window=w, causal=True): keys i-w .. i
    return None, lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
  raise ValueError(name)


def _prepare(name, arrays, block, window=40):
  """FlexAttention's arguments for our [B, S, H, D] arrays: (q, k, v) as [B, H, S, D]
  tensors, and the keywords (score_mod, block_mask, enable_gqa)."""
  score_mod, mask_mod = _mods(name, arrays, window)
  b, s, h, _ = arrays["q"].shape
  bm = None
  if mask_mod is not None:
    per_row = name in ("alibi_documents", "document", "prefix_lm")
    bm = create_block_mask(mask_mod, b if per_row else None, None, s, s, "cpu", BLOCK_SIZE=block)
  qkv = [torch.from_numpy(np.ascontiguousarray(arrays[x])).transpose(1, 2) for x in "qkv"]
  gqa = arrays["k"].shape[2] != h
  return qkv, dict(score_mod=score_mod, block_mask=bm, enable_gqa=gqa)


def _numpy(out):
  return out.transpose(1, 2).contiguous().numpy()  # back to [B, S, H, D]


def accuracy(inp: dict) -> dict:
  """Eager FlexAttention (its unfused float32 path) on the small inputs, every case:
  output and lse (FlexAttention has no backward on CPU)."""
  cases = json.loads(str(inp["cases"]))
  block = int(inp["block"])
  result = {}
  rel = torch.arange(-4 * 1024, 4 * 1024, dtype=torch.int32)
  result["t5_buckets"] = t5_bucket(rel).numpy()
  with torch.no_grad():
    for name in cases:
      qkv, kw = _prepare(name, inp, block)
      out, aux = flex_attention(*qkv, **kw, return_aux=AuxRequest(lse=True))
      result[f"{name}/out"] = _numpy(out)
      result[f"{name}/lse"] = aux.lse.numpy()
  return result


def timing(inp: dict) -> dict:
  """torch.compile'd FlexAttention (else eager, said) at the timing size: the first
  call (compile), the median forward ms, the block mask's build time, and the output
  for the cross-check."""
  cases = json.loads(str(inp["cases"]))
  block, window, repeats = int(inp["block"]), int(inp["window"]), int(inp["repeats"])
  result = {}
  compiled = torch.compile(flex_attention, dynamic=False)
  for name in cases:
    start = time.perf_counter()
    qkv, kw = _prepare(name, inp, block, window)
    mask_s = time.perf_counter() - start
    mode, fn = "compiled", compiled
    with torch.no_grad():
      start = time.perf_counter()
      try:
        out = fn(*qkv, **kw)
      except Exception as e:  # noqa: BLE001 - fall back to eager and say so
        print(f"[{name}] torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        mode, fn = "eager", flex_attention
        out = fn(*qkv, **kw)
      first = time.perf_counter() - start
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        fn(*qkv, **kw)
        times.append(time.perf_counter() - start)
    result[f"{name}/out"] = _numpy(out)
    result[f"{name}/ms"] = np.float64(np.median(times) * 1e3)
    result[f"{name}/first_s"] = np.float64(first)
    result[f"{name}/mask_s"] = np.float64(mask_s)
    result[f"{name}/mode"] = np.array(mode)
    ms = result[f"{name}/ms"]
    print(f"[{name}] flex {mode}: {ms:.1f} ms (first call {first:.1f} s)", flush=True)
  return result


def main(argv):
  what, src, dst = argv[1:4]
  torch.set_num_threads(int(np.load(src)["threads"]))
  inp = dict(np.load(src))
  result = {"accuracy": accuracy, "timing": timing}[what](inp)
  result["torch_version"] = np.array(torch.__version__)
  result["python_version"] = np.array(sys.version.split()[0])
  result["torch_threads"] = np.array(torch.get_num_threads())
  np.savez(dst, **result)


if __name__ == "__main__":
  main(sys.argv)
