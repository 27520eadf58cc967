"""Re-ttention's attention modes: dense calibration that also measures the mask's
softmax share, and the sparse step rescaled per row.

Re-ttention (ultra-sparse attention for diffusion transformers) keeps few attention
tiles and reuses softmax statistics across denoising steps. Per query row i, with
s_ij = q_i . k_j * scale:

  lse_i         logsumexp over all keys
  lse_masked_i  logsumexp over the keys the BlockMask M keeps (-inf if none)
  O_i           attention output over all keys
  O^M_i         attention output normalised over M's keys only (0 if none)
  r_i           exp(lse_masked_i - lse_i): the share of softmax mass inside M

`calibrate_attention` computes all of them in ONE pass over every tile: the dense
online softmax, and on M's tiles a second one with its own running max, so that
lse_masked and O^M are exact even where M's scores sit far below the row's max (where
M's share of the mass underflows float32, r = 0 but lse_masked stays finite). A sparse
step then runs `block_sparse_attention(q, k, v, M, row_scale=r)`, which returns
r_i * O^M_i: the in-mask part of the dense output, at the sparse cost.

Implementations of `calibrate_attention`: "reference" (naive float32), "xla" (query
chunks, O(chunk x Lk) memory, differentiable), "pallas_triton" / "pallas_tpu" (one
fused kernel, every tile visited once; no gradient: calibration runs at sampling time;
`interpret=True` runs them on a CPU), "pallas" (the current backend's kernel), None: the
backend's kernel on GPU/TPU when it takes the call, "xla" elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, dispatch
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.reference import reference_attention
from sparse_attention.pallas_kernels.block_sparse import gpu, tpu
from sparse_attention.pallas_kernels.block_sparse.common import element_visible

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu")
# kernel name -> (check_supported(q, k, v, mask), calibrate(q, k, v, mask, codes, ...))
_KERNELS = {
  "pallas_triton": (gpu.check_supported, gpu.calibrate_triton),
  "pallas_tpu": (tpu.check_calibration_supported, tpu.calibrate_tpu),
}
_CHUNK_SCORES = 1 << 22  # score elements per query chunk of the xla path


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["out", "lse", "lse_masked", "out_masked"],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Calibration:
  """What one calibration pass returns."""

  out: jax.Array  # [batch, q_len, q_heads, v_head_dim]: attention over all keys
  lse: jax.Array  # f32 [batch, q_heads, q_len]: logsumexp over all keys
  lse_masked: jax.Array  # f32 [batch, q_heads, q_len]: logsumexp over the mask's keys
  out_masked: jax.Array | None  # [batch, q_len, q_heads, v_head_dim]: O^M, or None

  @property
  def mass_ratio(self) -> jax.Array:
    """r = exp(lse_masked - lse), f32 [batch, q_heads, q_len]; 0 where the mask keeps
    no key of the row (or the row sees no key at all)."""
    finite = jnp.isfinite(self.lse_masked) & jnp.isfinite(self.lse)
    diff = jnp.where(finite, self.lse_masked - self.lse, 0.0)
    return jnp.where(finite, jnp.exp(diff), 0.0)


def calibrate_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: BlockMask,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  return_masked_output: bool = True,
  interpret: bool = False,
) -> Calibration:
  """Dense attention plus the softmax statistics of `mask`, in one pass.

  Args:
    q, k, v: `[batch, seq, heads, head_dim]` as for `block_sparse_attention`.
    mask: the sparse BlockMask M whose share of the softmax mass is measured.
    scale: softmax scale, default `head_dim ** -0.5`.
    implementation: None, "reference", "xla", "pallas", "pallas_triton" or "pallas_tpu"
      (module docstring).
    return_masked_output: also compute O^M (one more p @ v product on M's tiles).
    interpret: run the kernel in the Pallas interpreter (the TPU one in the TPU
      simulator).

  Returns:
    A `Calibration` (out, lse, lse_masked, out_masked) ; `.mass_ratio` gives r.
  """
  op = "calibrate_attention"
  shape = checks.check_qkv(q, k, v, op)
  checks.check_block_mask(mask, shape, op)
  scale = checks.check_scale(scale, shape, op)
  implementation = dispatch.resolve(
    implementation,
    interpret=interpret,
    op=op,
    implementations=IMPLEMENTATIONS,
    check=lambda kernel: _KERNELS[kernel][0](q, k, v, mask),
  )
  if implementation == "reference":
    out, lse = reference_attention(q, k, v, scale=scale, return_lse=True)
    out_m, lse_m = reference_attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    return Calibration(out, lse, lse_m, out_m if return_masked_output else None)
  if implementation == "xla":
    return _calibrate_xla(q, k, v, mask, scale, return_masked_output)
  calibrate = _KERNELS[implementation][1]  # a kernel: the names are resolved above
  visited, full = mask.block_layout()
  codes = visited.astype(jnp.int32) + (visited & ~full).astype(jnp.int32)
  out, lse, lse_m, out_m = calibrate(
    q,
    k,
    v,
    mask,
    codes,
    scale=scale,
    masked_output=return_masked_output,
    interpret=interpret,
  )
  return Calibration(out, lse, lse_m, out_m)


def _mask_rows(mask: BlockMask, visited, full, rows: jax.Array) -> jax.Array:
  """bool [Bm, Hm, len(rows), kv_len]: M restricted to the query positions `rows`
  (out-of-range rows see nothing); O(rows x kv_len), from M's tile layout
  `visited`, `full` (bool [Bm, Hm, Qb, Kb])."""
  cols = jnp.arange(mask.kv_len)
  tile_q = jnp.minimum(rows // mask.block_q, mask.num_q_blocks - 1)
  tile_kv = cols // mask.block_kv
  take = lambda x: x[:, :, tile_q][:, :, :, tile_kv]
  keep = take(visited)
  if mask.mask_fn is not None:
    bm, hm = mask.batch_heads
    b = jnp.arange(bm, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(hm, dtype=jnp.int32)[None, :, None, None]
    element = element_visible(mask.mask_fn, b, h, rows[:, None], cols[None, :], mask.mask_params)
    keep = keep & (take(full) | element)
  return keep & (rows < mask.q_len)[:, None]


def _softmax_terms(s: jax.Array):
  """(p = exp(s - max), l = sum p, lse) over the last axis of scores s (-inf where
  hidden); rows with nothing visible give p = l = 0 and lse = -inf."""
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1)
  lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return p, l, lse


def _calibrate_xla(q, k, v, mask: BlockMask, scale: float, masked_output: bool):
  b, lq, hq, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // hkv
  chunk = max(1, min(lq, _CHUNK_SCORES // max(1, b * hq * lk)))
  n_chunks = -(-lq // chunk)
  qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - lq), (0, 0), (0, 0)))
  qp = qp.reshape(b, n_chunks, chunk, hkv, g, d).transpose(1, 0, 2, 3, 4, 5)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  visited, full = mask.block_layout()

  def one_chunk(args):
    c, q_c = args  # q_c [B, chunk, Hkv, G, D]
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_c.astype(jnp.float32), kf) * scale
    rows = c * chunk + jnp.arange(chunk)
    keep = _mask_rows(mask, visited, full, rows)  # [Bm, Hm, chunk, Lk]
    keep = keep.reshape(keep.shape[0], hkv, g, chunk, lk) if keep.shape[1] > 1 else keep[:, :, None]
    p, l, lse = _softmax_terms(s)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf) / jnp.moveaxis(l, -1, 1)[..., None]
    # M's share under its own max: exact however far below the row's max it sits.
    p_m, l_m, lse_m = _softmax_terms(jnp.where(keep, s, -jnp.inf))
    if masked_output:
      l_safe = jnp.moveaxis(jnp.where(l_m > 0, l_m, 1.0), -1, 1)[..., None]
      o_m = jnp.einsum("bhgqk,bkhd->bqhgd", p_m, vf) / l_safe
    else:
      o_m = jnp.zeros((), jnp.float32)
    return o, lse, lse_m, o_m

  o, lse, lse_m, o_m = jax.lax.map(one_chunk, (jnp.arange(n_chunks), qp))
  # o: [chunks, B, chunk, Hkv, G, Dv] -> [B, Lq, Hq, Dv]; lse: [chunks, B, Hkv, G, chunk]
  to_out = lambda x: x.transpose(1, 0, 2, 3, 4, 5).reshape(b, -1, hq, dv)[:, :lq].astype(q.dtype)
  to_lse = lambda x: x.transpose(1, 2, 3, 0, 4).reshape(b, hq, -1)[:, :, :lq]
  return Calibration(to_out(o), to_lse(lse), to_lse(lse_m), to_out(o_m) if masked_output else None)
