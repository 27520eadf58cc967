"""Shared test helpers: inputs, brute-force masks, per-dtype comparisons."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from sparse_attention.ops import block_sparse_attention, masks

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# Max |a - b| allowed, relative to max(1, max |reference|), per input dtype.
# bf16 has an 8-bit mantissa (~4e-3 relative); scores and probabilities are
# rounded once more before the p @ v matmul, so outputs get a few ulps.
TOLERANCE = {
  "float32": {"out": 2e-5, "lse": 2e-5, "grad": 1e-4},
  "float16": {"out": 4e-3, "lse": 2e-3, "grad": 2e-2},
  "bfloat16": {"out": 3e-2, "lse": 2e-2, "grad": 8e-2},
}


def qkv(
  batch: int,
  q_len: int,
  kv_len: int,
  q_heads: int,
  kv_heads: int,
  head_dim: int,
  v_head_dim: int | None = None,
  dtype=jnp.float32,
  seed: int = 0,
):
  """Random q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  v_head_dim = v_head_dim or head_dim
  q = jax.random.normal(keys[0], (batch, q_len, q_heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, v_head_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_close(actual, expected, dtype, kind: str, what: str = ""):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  both_inf = np.isneginf(actual) & np.isneginf(expected)
  assert np.array_equal(np.isneginf(actual), np.isneginf(expected)), f"{what}: -inf pattern"
  assert np.all(np.isfinite(actual[~both_inf])), f"{what}: non-finite values"
  a, e = actual[~both_inf], expected[~both_inf]
  if a.size == 0:
    return
  tol = TOLERANCE[jnp.dtype(dtype).name][kind] * max(1.0, float(np.max(np.abs(e))))
  err = float(np.max(np.abs(a - e)))
  assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g} ({jnp.dtype(dtype).name})"


def _attend_fn(implementation, **kwargs):
  """`implementation` is an op implementation name (kwargs go to the op), or
  a callable `(q, k, v, mask) -> (out, lse)` such as a kernel entry point."""
  if callable(implementation):
    return implementation
  return lambda q, k, v, mask: block_sparse_attention(
    q, k, v, mask, implementation=implementation, return_lse=True, **kwargs
  )


def outputs_and_grads(q, k, v, mask, implementation, seed: int = 1, **kwargs):
  """Output, lse and (dq, dk, dv) of a random linear loss of both outputs."""
  attend = _attend_fn(implementation, **kwargs)
  out_shape = q.shape[:3] + (v.shape[-1],)
  ct_keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  ct_out = jax.random.normal(ct_keys[0], out_shape, jnp.float32)
  ct_lse = jax.random.normal(ct_keys[1], (q.shape[0], q.shape[2], q.shape[1]), jnp.float32)

  def loss(q, k, v):
    out, lse = attend(q, k, v, mask)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * ct_out) + jnp.sum(finite * ct_lse), (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


def assert_matches_reference(q, k, v, mask, implementation, what: str = "", **kwargs):
  """A kernel / the xla path vs the reference: outputs, lse and all three
  gradients. `implementation`: an op implementation name or a callable
  `(q, k, v, mask) -> (out, lse)`."""
  dtype = q.dtype
  out, lse, grads = outputs_and_grads(q, k, v, mask, implementation, **kwargs)
  r_out, r_lse, r_grads = outputs_and_grads(q, k, v, mask, "reference", **kwargs)
  assert out.dtype == dtype and out.shape == r_out.shape
  assert lse.dtype == jnp.float32
  assert_close(out, r_out, dtype, "out", f"{what} out")
  assert_close(lse, r_lse, dtype, "lse", f"{what} lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
    assert g.dtype == dtype
    assert_close(g, r, dtype, "grad", f"{what} {name}")


# ---------------------------------------------------------------------------
# Brute-force masks: [q_len, kv_len] bool, straight from the definitions.
# ---------------------------------------------------------------------------


def positions(q_len: int, kv_len: int):
  return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def brute_band(q_len, kv_len, lower, upper):
  i, j = positions(q_len, kv_len)
  out = np.ones((q_len, kv_len), bool)
  if lower is not None:
    out &= j - i >= lower
  if upper is not None:
    out &= j - i <= upper
  return out


def brute_chunk(q_len, kv_len, chunk, causal):
  i, j = positions(q_len, kv_len)
  out = (i // chunk) == (j // chunk)
  return out & (j <= i) if causal else out


def brute_layout(layout, q_len, kv_len, block_q, block_kv):
  """Expand a [B, H, Qb, Kb] tile layout to [B, H, q_len, kv_len]."""
  layout = np.asarray(layout)
  i, j = positions(q_len, kv_len)
  return layout[:, :, i // block_q, j // block_kv]


def check_invariants(mask) -> None:
  """The compact views are well formed and describe the same tiles."""
  bm, hm = mask.batch_heads
  qb, kb = mask.num_q_blocks, mask.num_kv_blocks
  assert mask.kv_count.shape == (bm, hm, qb) and mask.kv_count.dtype == jnp.int32
  assert mask.kv_index.shape[:3] == (bm, hm, qb) and mask.kv_index.dtype == jnp.int32
  assert mask.kv_partial.shape == mask.kv_index.shape and mask.kv_partial.dtype == jnp.bool_
  assert mask.q_count.shape == (bm, hm, kb) and mask.q_index.shape[:3] == (bm, hm, kb)
  assert mask.q_partial.shape == mask.q_index.shape
  tiles = []
  for count, index, partial, n_cols in (
    (mask.kv_count, mask.kv_index, mask.kv_partial, kb),
    (mask.q_count, mask.q_index, mask.q_partial, qb),
  ):
    count, index, partial = map(np.asarray, (count, index, partial))
    cap = index.shape[-1]
    assert (count >= 0).all() and (count <= cap).all()
    layout = np.zeros(count.shape + (n_cols,), np.int8)  # 0 none, 1 full, 2 partial
    for pos in np.ndindex(count.shape):
      c = count[pos]
      listed = index[pos][:c]
      assert (np.diff(listed) > 0).all(), "ids must ascend"
      assert ((listed >= 0) & (listed < n_cols)).all()
      pad = index[pos][c:]
      assert (pad == (listed[-1] if c else 0)).all(), "padding must repeat the last id"
      layout[pos + (listed,)] = np.where(partial[pos][:c], 2, 1)
    tiles.append(layout)
  np.testing.assert_array_equal(tiles[0], tiles[1].swapaxes(-1, -2))
  if mask.mask_fn is None:
    assert not (tiles[0] == 2).any(), "partial tiles need a mask_fn"


# ---------------------------------------------------------------------------
# One mask of every kind, for the implementation-vs-reference tests.
# ---------------------------------------------------------------------------

Q_LEN, KV_LEN = 100, 90  # ragged for the default block sizes


def random_layout(bm, hm, q_len, kv_len, block_q, block_kv, density, seed=0) -> np.ndarray:
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  return np.random.default_rng(seed).random((bm, hm, qb, kb)) < density


def mask_cases(
  q_len: int = Q_LEN,
  kv_len: int = KV_LEN,
  block_q: int = 32,
  block_kv: int = 16,
  heads: int = 4,
  unit: int = 10,
) -> dict:
  """Every builder (and a union / intersection) at one geometry; `unit`
  scales windows, chunks and offsets. Layout masks vary over 2 batches and
  `heads` query heads."""
  geo = dict(block_q=block_q, block_kv=block_kv)
  g = dict(q_len=q_len, kv_len=kv_len, **geo)
  qb, kb = -(-q_len // block_q), -(-kv_len // block_kv)
  layout = lambda bm, hm, density, seed=0: random_layout(
    bm, hm, q_len, kv_len, block_q, block_kv, density, seed
  )
  return {
    "dense": masks.dense(q_len, kv_len, **geo),
    "causal": masks.causal(q_len, kv_len, **geo),
    "causal_empty_rows": masks.causal(q_len, kv_len, offset=-4 * unit, **geo),
    "window_causal": masks.sliding_window(q_len, kv_len, window=2 * unit, causal=True, **geo),
    "window_left_right": masks.sliding_window(
      q_len, kv_len, window=(unit * 7 // 10, 3 * unit), **geo
    ),
    "chunked_causal": masks.chunked(q_len, kv_len, chunk=unit * 24 // 10, causal=True, **geo),
    "window_with_anchors": masks.window_with_anchors(
      q_len, kv_len, window=unit, num_anchors=min(2, kb), offset=1, **geo
    ),
    "layout_per_batch_head": masks.from_layout(layout(2, heads, 0.3), **g),
    "layout_broadcast_heads": masks.from_layout(layout(2, 1, 0.4), **g),
    "topk_causal_diag": masks.topk_blocks(
      jax.random.normal(jax.random.PRNGKey(3), (1, heads, qb, kb)),
      min(3, kb),
      keep_diagonal=True,
      causal=True,
      **g,
    ),
    "union": masks.union(
      masks.sliding_window(q_len, kv_len, window=unit // 2, **geo),
      masks.from_layout(layout(1, heads, 0.2, seed=1), **g),
    ),
    "intersection": masks.intersection(
      masks.causal(q_len, kv_len, **geo),
      masks.from_layout(layout(2, 1, 0.6, seed=2), **g),
    ),
  }


def lower_for_cuda(fn, *args) -> str:
  """StableHLO text of `jax.jit(fn)` lowered for CUDA on this (CPU) host. Pallas's Triton
  lowering asks for the target GPU (jax >= 0.11): an abstract H200 stands in for it."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def load_config(name: str, *overrides: str):
  """configs/<name>.py as `train/main.py` parses it, with command-line overrides
  (e.g. "--config.steps=4")."""
  argv = ["prog", f"--config={ROOT / 'configs' / name}.py", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


# ---------------------------------------------------------------------------
# Image folders for the data pipeline.
# ---------------------------------------------------------------------------

# (format, Pillow mode) of the files `write_image_folder` cycles through.
IMAGE_KINDS = (
  ("JPEG", "RGB"),
  ("PNG", "L"),
  ("WEBP", "RGBA"),
  ("PNG", "P"),
  ("JPEG", "L"),
  ("WEBP", "RGB"),
  ("PNG", "RGBA"),
  ("PNG", "I;16"),
)


def write_image_folder(root, classes=("cat", "dog"), per_class=8, seed=0, stray=True) -> dict:
  """An image folder of mixed formats, modes and odd sizes (cycling IMAGE_KINDS); each
  image is one solid colour. Returns {relative path: (label, RGB colour 0..255)}; a
  stray `notes.txt` sits in the first class folder when `stray`."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  out = {}
  for label, name in enumerate(classes):
    folder = pathlib.Path(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      fmt, mode = IMAGE_KINDS[(label * per_class + i) % len(IMAGE_KINDS)]
      h, w = (int(v) for v in rng.integers(9, 40, 2))
      color = tuple(int(v) for v in rng.integers(0, 256, 3))
      if mode in ("L", "I;16"):
        color = (round(0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]),) * 3
      image = Image.new("RGB", (w, h), color)
      if mode == "I;16":
        image = Image.fromarray(np.full((h, w), color[0] * 257, np.uint16))
      elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
      elif mode == "RGBA":
        image.putalpha(100)  # translucent: the alpha is dropped, the colour kept
      elif mode != "RGB":
        image = image.convert(mode)
      relative = f"{name}/{i:02d}.{fmt.lower()}"
      image.save(pathlib.Path(root, relative), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
      out[relative] = (label, color)
  if stray:
    pathlib.Path(root, classes[0], "notes.txt").write_text("not an image")
  return out


def fake_devices_env(devices: int, **extra: str) -> dict:
  """The environment for a subprocess with `devices` fake CPU devices: this one's, with
  the device count added to its XLA_FLAGS (keeping the suite's other flags)."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return dict(os.environ, XLA_FLAGS=flags, **extra)


def run_worker(script: str | os.PathLike, *args: str, devices: int) -> dict:
  """Runs `python SCRIPT ARGS...` (a path relative to tests/) in a process of its own
  with `devices` fake CPU devices (the count is fixed when jax starts) and returns the
  JSON of the last `RESULT {...}` line it prints; it must exit 0 (the test fails with
  the tails of its output)."""
  proc = subprocess.run(
    [sys.executable, str(TESTS / script), *args],
    env=fake_devices_env(devices),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])
