"""`hilo_attention`: the attention part of LITv2's HiLo layer, given projected q/k/v.

HiLo ("Fast Vision Transformers with HiLo Attention", Pan et al., 2022) splits
the heads of one attention layer into two branches over an H x W token grid:

* Hi-Fi heads attend inside non-overlapping `ws x ws` windows (local, high
  frequencies).
* Lo-Fi heads attend from every token to keys/values computed from the
  `ws x ws` average-pooled grid (global, low frequencies).

This op is the part between the projections: the layer (`models.litv2.HiLo`)
pads the input, projects it, pools it for the Lo-Fi keys/values, calls this op,
then applies `h_proj` / `l_proj`, crops and concatenates.

Layout (all `[batch, tokens, heads, head_dim]`, like `jax.nn.dot_product_attention`):

* `grid = (Hp, Wp)` is the *padded* token grid; both must be multiples of
  `window_size` (ws). N = Hp * Wp.
* `hi_q`, `hi_k`, `hi_v`: `[B, N, h_heads, D]`, tokens in row-major order over
  the padded grid (token t = r * Wp + c). Token (r, c) attends to the ws * ws
  tokens of its window (r // ws, c // ws), window index gi * (Wp // ws) + gj.
  No mask: tokens of the padding take part in their windows.
* `lo_q`: `[B, N, l_heads, D]`, row-major over the padded grid.
  `lo_k`, `lo_v`: `[B, M, l_heads, D]` with M = (Hp // ws) * (Wp // ws), row-major
  over the pooled grid. Every query attends to all M keys (ws = 1: M = N, plain
  multi-head self-attention).
* A branch with no heads is passed as three `None`s and returns `None`.
  Both branches share batch and dtype; heads are never grouped (no GQA).
* One softmax scale for both branches, default `head_dim ** -0.5`.

Returns `(hi_out, lo_out)`: `[B, N, h_heads, Dv]` and `[B, N, l_heads, Dv]`, in the
input dtype, same token order as the queries.

Implementations: "reference" (float32, obviously correct: Hi-Fi as dense
attention under a boolean same-window mask, Lo-Fi as dense attention, both via
`reference_attention`) and "xla" (fast pure JAX, no gathers: windows are a
reshape + transpose of the row-major grid to `[B, Hp/ws, Wp/ws, heads, ws*ws, D]`, so
Hi-Fi is two batched matmuls; Lo-Fi is a plain softmax over the short pooled key set
with head-major `[b, heads, n, M]` scores, taken in (batch, query) chunks of about
2**21 scores that stay near the cache; float32 scores, softmax and accumulation,
the softmax normalised after p @ v). Both are differentiable with `jax.grad`.
`implementation=None` picks "xla" (the Pallas kernel comes later).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention.ops import block_sparse, checks, dispatch, masks
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.reference import reference_attention

IMPLEMENTATIONS = ("reference", "xla", "pallas", *dispatch.KERNELS)
_OP = "hilo_attention"
# Lo-Fi scores per chunk of the xla path: 2**21 float32 scores (8 MiB) keep a chunk's
# softmax near the cache; measured on CPU (2 cores), 1.3-5x faster than one
# [B, h, N, M] block at 14x14..56x56 grids (2**20..2**22 were within noise).
_LOFI_CHUNK_SCORES = 1 << 21


def hilo_attention(
  hi_q: jax.Array | None,  # [batch, Hp*Wp, h_heads, head_dim]
  hi_k: jax.Array | None,  # [batch, Hp*Wp, h_heads, head_dim]
  hi_v: jax.Array | None,  # [batch, Hp*Wp, h_heads, v_head_dim]
  lo_q: jax.Array | None,  # [batch, Hp*Wp, l_heads, head_dim]
  lo_k: jax.Array | None,  # [batch, (Hp/ws)*(Wp/ws), l_heads, head_dim]
  lo_v: jax.Array | None,  # [batch, (Hp/ws)*(Wp/ws), l_heads, v_head_dim]
  *,
  grid: tuple[int, int],
  window_size: int,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
) -> tuple[jax.Array | None, jax.Array | None]:
  """HiLo attention: Hi-Fi window attention and Lo-Fi attention on pooled keys.

  Args:
    hi_q, hi_k, hi_v: the Hi-Fi branch, `[batch, Hp*Wp, h_heads, head_dim]`, tokens
      row-major over the padded grid; or three `None`s (no Hi-Fi heads).
    lo_q: the Lo-Fi queries `[batch, Hp*Wp, l_heads, head_dim]`, row-major.
    lo_k, lo_v: the Lo-Fi keys/values from the pooled grid,
      `[batch, (Hp//ws)*(Wp//ws), l_heads, head_dim]`, row-major; or
      `lo_q = lo_k = lo_v = None` (no Lo-Fi heads).
    grid: `(Hp, Wp)`, the padded token grid; multiples of `window_size`.
    window_size: ws, the side of the Hi-Fi windows and of the Lo-Fi pooling.
    scale: softmax scale of both branches, default `head_dim ** -0.5`.
    implementation: None (the best available: "pallas" on GPU and TPU, "xla"
      elsewhere), "reference", "xla", or a Pallas kernel: "pallas" (the
      platform's), "pallas_mosaic_gpu", "pallas_triton", "pallas_tpu" (see
      `block_sparse_attention`).
      The Pallas path runs each branch through the block-sparse kernels: Hi-Fi
      as window-major tokens under a `chunked(ws*ws)` mask (only diagonal tiles
      are visited), Lo-Fi as dense attention on the pooled keys.
    interpret: run the Pallas kernels in the interpreter / TPU simulator.

  Returns:
    `(hi_out, lo_out)`, `[batch, Hp*Wp, heads, v_head_dim]` each in the input
    dtype (row-major tokens), `None` for an absent branch.

  Raises:
    ValueError: on bad shapes, dtypes, grid, window size or implementation,
      before anything is computed.
  """
  hp, wp, ws = _check_grid(grid, window_size)
  n, m = hp * wp, (hp // ws) * (wp // ws)
  hi = _check_branch("hi", (hi_q, hi_k, hi_v), n, n)
  lo = _check_branch("lo", (lo_q, lo_k, lo_v), n, m)
  if hi is None and lo is None:
    raise ValueError(f"{_OP}: both branches are None; pass hi_q/hi_k/hi_v or lo_q/lo_k/lo_v.")
  if hi is not None and lo is not None:
    if hi_q.shape[0] != lo_q.shape[0]:
      raise ValueError(f"{_OP}: batch sizes differ: hi_q {hi_q.shape[0]}, lo_q {lo_q.shape[0]}.")
    if hi_q.dtype != lo_q.dtype:
      raise ValueError(
        f"{_OP}: both branches must share one dtype, got hi_q {hi_q.dtype}, lo_q {lo_q.dtype}."
      )
  if hi is not None and lo is not None and scale is None and hi.head_dim != lo.head_dim:
    raise ValueError(
      f"{_OP}: hi_q head_dim {hi.head_dim} != lo_q head_dim {lo.head_dim}; pass one `scale`."
    )
  scale = checks.check_scale(scale, hi or lo, _OP)  # default head_dim ** -0.5

  def check(kernel: str) -> None:  # each present branch, on the mask it would use
    if hi is not None:
      bq, bk = _HIFI_BLOCKS[kernel]
      mask = masks.chunked(n, n, chunk=ws * ws, block_q=bq, block_kv=bk)
      block_sparse.check_kernel(kernel, hi_q, hi_k, hi_v, mask)
    if lo is not None:
      bq, bk = _LOFI_BLOCKS[kernel]
      block_sparse.check_kernel(
        kernel, lo_q, lo_k, lo_v, masks.dense(n, m, block_q=bq, block_kv=bk)
      )

  implementation = dispatch.resolve(
    implementation, interpret=interpret, op=_OP, implementations=IMPLEMENTATIONS, check=check
  )
  if implementation == "reference":
    hi_fn, lo_fn = _hifi_reference, _lofi_reference
  elif implementation == "xla":
    hi_fn, lo_fn = _hifi_xla, _lofi_xla
  else:  # a kernel
    kw = dict(implementation=implementation, interpret=interpret)
    hi_fn = functools.partial(_hifi_pallas, blocks=_HIFI_BLOCKS[implementation], **kw)
    lo_fn = functools.partial(_lofi_pallas, blocks=_LOFI_BLOCKS[implementation], **kw)
  hi_out = None if hi is None else hi_fn(hi_q, hi_k, hi_v, (hp, wp), ws, scale)
  lo_out = None if lo is None else lo_fn(lo_q, lo_k, lo_v, scale)
  return hi_out, lo_out


def pooled_grid(grid: tuple[int, int], window_size: int) -> tuple[int, int]:
  """The grid of the Lo-Fi keys/values: (Hp // ws, Wp // ws)."""
  hp, wp, ws = _check_grid(grid, window_size)
  return hp // ws, wp // ws


def padded_grid(height: int, width: int, window_size: int) -> tuple[int, int]:
  """(H, W) rounded up to multiples of the window size, as LITv2 pads."""
  return -(-height // window_size) * window_size, -(-width // window_size) * window_size


# --------------------------------------------------------------------------- checks


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_grid(grid: Any, window_size: Any) -> tuple[int, int, int]:
  if not _is_int(window_size) or window_size < 1:
    raise ValueError(f"{_OP}: window_size must be a positive int, got {window_size!r}.")
  if (
    not isinstance(grid, (tuple, list))
    or len(grid) != 2
    or not all(_is_int(g) and g > 0 for g in grid)
  ):
    raise ValueError(f"{_OP}: grid must be (Hp, Wp), two positive ints, got {grid!r}.")
  hp, wp = int(grid[0]), int(grid[1])
  if hp % window_size or wp % window_size:
    raise ValueError(
      f"{_OP}: grid {(hp, wp)} must be multiples of window_size={window_size} (pad the "
      f"token grid to {padded_grid(hp, wp, window_size)} first, as the HiLo layer does)."
    )
  return hp, wp, int(window_size)


def _check_branch(
  branch: str, arrays: tuple[Any, Any, Any], q_len: int, kv_len: int
) -> checks.AttentionShape | None:
  names = tuple(f"{branch}_{x}" for x in "qkv")
  present = [a is not None for a in arrays]
  if not any(present):
    return None
  if not all(present):
    missing = [n for n, p in zip(names, present, strict=True) if not p]
    raise ValueError(f"{_OP}: {', '.join(missing)} is None; pass all of {names} or none.")
  for name, x in zip(names, arrays, strict=True):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{_OP}: {name} must be an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(
        f"{_OP}: {name} must have rank 4, [batch, tokens, heads, head_dim], "
        f"got shape {tuple(x.shape)}."
      )
    if not any(x.dtype == d for d in checks.SUPPORTED_DTYPES):
      raise ValueError(f"{_OP}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16.")
  q, k, v = arrays
  nq, nk, nv = names
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
      f"{_OP}: {nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
    )
  b, sq, h, d = q.shape
  what = "the padded grid Hp*Wp" if branch == "hi" else "the pooled grid (Hp/ws)*(Wp/ws)"
  if sq != q_len:
    raise ValueError(
      f"{_OP}: {nq} has {sq} tokens (dim 1); expected the padded grid Hp*Wp = {q_len}."
    )
  for name, x in ((nk, k), (nv, v)):
    if x.shape[0] != b:
      raise ValueError(f"{_OP}: {name} batch {x.shape[0]} != {nq} batch {b} (dim 0).")
    if x.shape[1] != kv_len:
      raise ValueError(
        f"{_OP}: {name} has {x.shape[1]} tokens (dim 1); expected {what} = {kv_len}."
      )
    if x.shape[2] != h:
      raise ValueError(
        f"{_OP}: {name} has {x.shape[2]} heads (dim 2); expected {nq}'s {h} (no grouped heads)."
      )
  if k.shape[3] != d:
    raise ValueError(f"{_OP}: {nk} head_dim {k.shape[3]} != {nq} head_dim {d} (dim 3).")
  if min(b, h, d, v.shape[3]) == 0:
    raise ValueError(f"{_OP}: empty input: {nq} {tuple(q.shape)}, {nv} {tuple(v.shape)}.")
  return checks.AttentionShape(b, sq, kv_len, h, h, d, v.shape[3])


# ------------------------------------------------------------------------ reference


@functools.lru_cache(maxsize=16)
def _window_mask(hp: int, wp: int, ws: int) -> np.ndarray:
  """bool[1, 1, N, N]: token i sees token j iff both lie in the same ws x ws window."""
  r, c = np.divmod(np.arange(hp * wp), wp)
  window = (r // ws) * (wp // ws) + c // ws  # window index gi * (Wp/ws) + gj
  return (window[:, None] == window[None, :])[None, None]


def _hifi_reference(q, k, v, grid, ws, scale):
  mask = jnp.asarray(_window_mask(*grid, ws))
  return reference_attention(q, k, v, mask=mask, scale=scale)


def _lofi_reference(q, k, v, scale):
  return reference_attention(q, k, v, scale=scale)


# ------------------------------------------------------------------------------ xla


def _hifi_xla(
  q: jax.Array,  # [B, N, h, D], N = Hp*Wp row-major
  k: jax.Array,  # [B, N, h, D]
  v: jax.Array,  # [B, N, h, Dv]
  grid: tuple[int, int],
  ws: int,
  scale: float,
) -> jax.Array:  # [B, N, h, Dv]
  b, n, h, _ = q.shape
  gh, gw = grid[0] // ws, grid[1] // ws
  t = ws * ws

  def windows(x):  # row-major token (gi*ws + i) * Wp + gj*ws + j -> [B, gi, gj, h, i*ws + j, D]
    x = x.reshape(b, gh, ws, gw, ws, h, x.shape[-1]).transpose(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, gh, gw, h, t, x.shape[-1])

  # Window-major batched matmuls: explicit transposes in and out beat dots that
  # read/write the row-major layout directly (measured on CPU, bench/hilo_cpu.py).
  s = jnp.einsum(
    "bxyhqd,bxyhkd->bxyhqk", windows(q), windows(k), preferred_element_type=jnp.float32
  )
  s = s * scale  # [B, gi, gj, h, T, T]
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum(
    "bxyhqk,bxyhkd->bxyhqd", p.astype(v.dtype), windows(v), preferred_element_type=jnp.float32
  )
  o = (o / l).reshape(b, gh, gw, h, ws, ws, -1).transpose(0, 1, 4, 2, 5, 3, 6)
  return o.reshape(b, n, h, -1).astype(q.dtype)  # [B, gi, i, gj, j, h, Dv] -> row-major


def _lofi_chunks(batch: int, n: int, heads: int, m: int) -> tuple[int, int]:
  """(batch chunk, query chunk) keeping one chunk's scores near _LOFI_CHUNK_SCORES."""
  per_batch = heads * n * m
  if per_batch <= _LOFI_CHUNK_SCORES:
    cb = max(
      c for c in range(1, batch + 1) if batch % c == 0 and c * per_batch <= _LOFI_CHUNK_SCORES
    )
    return cb, n
  return 1, max(1, min(n, _LOFI_CHUNK_SCORES // (heads * m)))


def _lofi_xla(
  q: jax.Array,  # [B, N, h, D]
  k: jax.Array,  # [B, M, h, D]
  v: jax.Array,  # [B, M, h, Dv]
  scale: float,
) -> jax.Array:  # [B, N, h, Dv]
  """Every query over all M keys, in chunks of (batch, queries) whose scores stay cache-sized.

  Chunks are visited by a `fori_loop` (differentiable: its trip count is static).
  A last query chunk that would run past N starts earlier instead (dynamic_slice
  clamps), recomputing a few rows with identical results, so nothing is padded.
  """
  b, n, h, d = q.shape
  cb, cq = _lofi_chunks(b, n, h, k.shape[1])
  if (cb, cq) == (b, n):
    return _lofi_block(q, k, v, scale)
  nb, nq = b // cb, -(-n // cq)

  def body(i, out):
    b0 = (i // nq) * cb
    q0 = jnp.minimum((i % nq) * cq, n - cq)
    qc = jax.lax.dynamic_slice(q, (b0, q0, 0, 0), (cb, cq, h, d))
    kc = jax.lax.dynamic_slice_in_dim(k, b0, cb, axis=0)
    vc = jax.lax.dynamic_slice_in_dim(v, b0, cb, axis=0)
    return jax.lax.dynamic_update_slice(out, _lofi_block(qc, kc, vc, scale), (b0, q0, 0, 0))

  out = jnp.zeros((b, n, h, v.shape[-1]), q.dtype)
  return jax.lax.fori_loop(0, nb * nq, body, out)


def _lofi_block(
  q: jax.Array,  # [b, n, h, D]
  k: jax.Array,  # [b, M, h, D]
  v: jax.Array,  # [b, M, h, Dv]
  scale: float,
) -> jax.Array:  # [b, n, h, Dv]
  # Head-major scores and output: on CPU a dot that writes [b, n, h, Dv] directly
  # is ~5x slower than one writing [b, h, n, Dv] plus one transpose. The softmax
  # is normalised after p @ v (n * Dv divisions instead of n * M).
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m)  # [b, h, n, M]
  l = jnp.sum(p, axis=-1, keepdims=True)  # [b, h, n, 1]
  o = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return jnp.transpose(o / l, (0, 2, 1, 3)).astype(q.dtype)


# ---------------------------------------------------------------------------- pallas

# Tile sizes of the block-sparse kernels per branch (block_q, block_kv): Triton
# needs powers of two >= 16; Mosaic TPU fills its 128 lanes with 128; Mosaic GPU's
# smallest wgmma tile is 64.
_HIFI_BLOCKS = {"pallas_mosaic_gpu": (64, 64), "pallas_triton": (16, 16), "pallas_tpu": (128, 128)}
_LOFI_BLOCKS = {"pallas_mosaic_gpu": (64, 64), "pallas_triton": (64, 64), "pallas_tpu": (128, 128)}


def _hifi_pallas(q, k, v, grid, ws, scale, *, blocks, implementation, interpret):
  """Window-major tokens: window w holds tokens [w*ws^2, (w+1)*ws^2), so "same
  window" is a chunked mask and the kernel visits only the diagonal tiles."""
  b, n, h, _ = q.shape
  gh, gw = grid[0] // ws, grid[1] // ws
  t = ws * ws

  def window_major(x):  # [B, N, h, D] row-major -> [B, N, h, D] window-major
    x = x.reshape(b, gh, ws, gw, ws, h, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, n, h, x.shape[-1])

  mask = masks.chunked(n, n, chunk=t, block_q=blocks[0], block_kv=blocks[1])
  o = block_sparse_attention(
    window_major(q),
    window_major(k),
    window_major(v),
    mask,
    scale=scale,
    implementation=implementation,
    interpret=interpret,
  )
  o = o.reshape(b, gh, gw, ws, ws, h, -1).transpose(0, 1, 3, 2, 4, 5, 6)
  return o.reshape(b, n, h, -1)


def _lofi_pallas(q, k, v, scale, *, blocks, implementation, interpret):
  """All N queries over the M pooled keys: the all-kept mask."""
  mask = masks.dense(q.shape[1], k.shape[1], block_q=blocks[0], block_kv=blocks[1])
  return block_sparse_attention(
    q, k, v, mask, scale=scale, implementation=implementation, interpret=interpret
  )


__all__ = ["IMPLEMENTATIONS", "hilo_attention", "padded_grid", "pooled_grid"]
