"""`permuted_attention`: semantic-aware permutation (Sparse VideoGen2 style).

A window or tile mask keeps keys near each query in the sequence; similar tokens far
apart (the same object in distant frames, a repeated phrase) are lost. Clustering finds
them: per head, the queries and the keys are clustered by k-means (`ops.kmeans`), the
tokens permuted so that each cluster is contiguous, and a query cluster attends to the
key clusters whose centroids score highest, top-p (ZipVL's rule, `masks.top_p`) over

    score[a, c] = scale * centroid_q[a] . centroid_k[c] + log |cluster c|

(the mass of cluster c if its keys all scored like its centroid). In the permuted order
the kept cluster pairs are dense rectangles, so the block-sparse op skips whole tiles;
cluster sizes are whatever k-means gives: tiles that mix clusters are partial, and an
element mask (query cluster, key cluster) -> kept decides inside them, exactly. The
output is permuted back to the original order.

Per head: query clusters per query head, key clusters per kv head (shared by a GQA
group, whose queries see one permuted key order). The clustering and the selection are
discrete (no gradient, as the top-k/top-p of the other dynamic masks); the attention is
differentiable in q, k, v. Bidirectional only (no causal variant: a permutation has no
notion of the future). k-means starts from evenly strided tokens (deterministic).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, element_masks, masks
from sparse_attention.ops.block_mask import (
  BlockMask,
  from_block_layout,
  num_blocks,
  scatter_columns,
)
from sparse_attention.ops.block_sparse import block_sparse_attention
from sparse_attention.ops.kmeans import kmeans

_OP = "permuted_attention"


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["q_order", "kv_order", "q_cluster", "kv_cluster", "keep", "mask"],
  meta_fields=[],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class PermutedLayout:
  """The clustering, the permutation and the mask of one `permuted_attention` call.

  Attributes:
    q_order: int32 [B, Hq, Sq]: permuted position i holds query token q_order[..., i].
    kv_order: int32 [B, Hkv, Sk]: likewise for the keys, per kv head.
    q_cluster: int32 [B, Hq, Sq]: the cluster of permuted query position i (ascending).
    kv_cluster: int32 [B, Hq, Sk]: the cluster of permuted key position j, per query head
      (its kv head's).
    keep: bool [B, Hq, Cq, Ck]: the (query cluster, key cluster) pairs attended.
    mask: the BlockMask over the permuted layout.
  """

  q_order: jax.Array
  kv_order: jax.Array
  q_cluster: jax.Array
  kv_cluster: jax.Array
  keep: jax.Array
  mask: BlockMask

  def density(self) -> jax.Array:
    """float32 [B, Hq]: the fraction of (query, key) pairs attended."""
    sq, sk = self.q_cluster.shape[-1], self.kv_cluster.shape[-1]
    cq, ck = self.keep.shape[-2:]
    size_q = jax.nn.one_hot(self.q_cluster, cq, dtype=jnp.float32).sum(-2)  # [B, Hq, Cq]
    size_k = jax.nn.one_hot(self.kv_cluster, ck, dtype=jnp.float32).sum(-2)
    pairs = jnp.einsum("bha,bhac,bhc->bh", size_q, self.keep.astype(jnp.float32), size_k)
    return pairs / (sq * sk)


def _kept_pair(b, h, q_idx, kv_idx, params):
  """The element mask of the permuted layout: is (query cluster, key cluster) kept."""
  q_cluster, kv_cluster, keep = params
  return keep[b, h, q_cluster[b, h, q_idx], kv_cluster[b, h, kv_idx]]


def _cluster(x: jax.Array, clusters: int, iterations: int, implementation, interpret):
  """x [B, S, H, D] -> per (b, h): (centroids f32 [B, H, C, D], ids int32 [B, H, S])."""
  b, s, h, d = x.shape
  points = jnp.swapaxes(x, 1, 2).reshape(b * h, s, d).astype(jnp.float32)
  init = points[:, (jnp.arange(clusters) * s) // clusters]  # evenly strided tokens
  centroids, ids = kmeans(
    points, init, iterations=iterations, implementation=implementation, interpret=interpret
  )
  return centroids.reshape(b, h, clusters, d), ids.reshape(b, h, s).astype(jnp.int32)


def _rectangle_sums(table: jax.Array, rows: tuple, cols: tuple) -> jax.Array:
  """Sums of table [B, H, R, C] over the rectangles [row_lo, row_hi] x [col_lo, col_hi]
  (rows: ([B, H, Qb], [B, H, Qb]), cols: ([B, H, Kb], ...)) -> [B, H, Qb, Kb]."""
  p = jnp.pad(jnp.cumsum(jnp.cumsum(table, axis=-2), axis=-1), ((0, 0), (0, 0), (1, 0), (1, 0)))
  bi = jnp.arange(p.shape[0])[:, None, None, None]
  hi = jnp.arange(p.shape[1])[None, :, None, None]
  at = lambda r, c: p[bi, hi, r[..., :, None], c[..., None, :]]
  (r0, r1), (c0, c1) = rows, cols
  return at(r1 + 1, c1 + 1) - at(r0, c1 + 1) - at(r1 + 1, c0) + at(r0, c0)


def _tile_ranges(cluster: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Sorted cluster ids [B, H, S] -> the first and last id of each tile, [B, H, Sb]."""
  s = cluster.shape[-1]
  first = jnp.arange(num_blocks(s, block)) * block
  last = jnp.minimum(first + block, s) - 1
  return cluster[..., first], cluster[..., last]


def permuted_layout(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  *,
  num_q_clusters: int,
  num_kv_clusters: int,
  top_p: float,
  iterations: int = 10,
  block_q: int = 64,
  block_kv: int = 64,
  scale: float | None = None,
  kmeans_implementation: str | None = None,
  interpret: bool = False,
) -> PermutedLayout:
  """Clusters q and k per head, permutes them by cluster and builds the mask (see the
  module docstring); `permuted_attention` with the same arguments runs on it."""
  shape = checks.check_qkv(q, k, k, _OP)
  for name, x, most in (
    ("num_q_clusters", num_q_clusters, shape.q_len),
    ("num_kv_clusters", num_kv_clusters, shape.kv_len),
    ("block_q", block_q, None),
    ("block_kv", block_kv, None),
  ):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1 or (most and x > most):
      bound = f" and <= {most} (the tokens)" if most else ""
      raise ValueError(f"{_OP}: {name} must be an int >= 1{bound}, got {x!r}.")
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
    raise ValueError(f"{_OP}: iterations must be an int >= 0, got {iterations!r}.")
  if isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and not 0 < top_p <= 1:
    raise ValueError(f"{_OP}: top_p must be in (0, 1], got {top_p!r}.")
  scale = checks.check_scale(scale, shape, _OP)
  b, sq, hq, _ = q.shape
  sk, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  cq, q_ids = _cluster(q, num_q_clusters, iterations, kmeans_implementation, interpret)
  ck, k_ids = _cluster(k, num_kv_clusters, iterations, kmeans_implementation, interpret)
  size_q = jax.nn.one_hot(q_ids, num_q_clusters, dtype=jnp.int32).sum(-2)  # [B, Hq, Cq]
  size_k = jax.nn.one_hot(k_ids, num_kv_clusters, dtype=jnp.int32).sum(-2)  # [B, Hkv, Ck]
  size_k, ck = jnp.repeat(size_k, group, axis=1), jnp.repeat(ck, group, axis=1)  # per q head
  score = jnp.einsum("bhad,bhcd->bhac", cq, ck, precision=jax.lax.Precision.HIGHEST) * scale
  score = jnp.where(size_k[:, :, None] > 0, score + jnp.log(size_k[:, :, None]), -jnp.inf)
  index, kept = masks.top_p(score, top_p)  # [B, Hq, Cq, Ck] in the order taken
  keep = scatter_columns(index, kept, num_kv_clusters)
  q_order = jnp.argsort(q_ids, axis=-1, stable=True).astype(jnp.int32)  # [B, Hq, Sq]
  kv_order = jnp.argsort(k_ids, axis=-1, stable=True).astype(jnp.int32)  # [B, Hkv, Sk]
  q_cluster = jnp.take_along_axis(q_ids, q_order, axis=-1)
  kv_cluster = jnp.repeat(jnp.take_along_axis(k_ids, kv_order, axis=-1), group, axis=1)
  # Tiles: kept if a kept pair of non-empty clusters meets in them, full if every
  # non-empty pair there is kept (empty clusters never occur in a tile).
  present = (size_q[..., :, None] > 0) & (size_k[..., None, :] > 0)  # [B, Hq, Cq, Ck]
  rows, cols = _tile_ranges(q_cluster, block_q), _tile_ranges(kv_cluster, block_kv)
  kept_pairs = _rectangle_sums((keep & present).astype(jnp.int32), rows, cols)
  all_pairs = _rectangle_sums(present.astype(jnp.int32), rows, cols)
  mask = from_block_layout(
    kept_pairs > 0,
    kept_pairs == all_pairs,
    block_q=block_q,
    block_kv=block_kv,
    q_len=sq,
    kv_len=sk,
    mask_fn=element_masks.MaskMod(_kept_pair, has_params=True),
    mask_params=((q_cluster, kv_cluster, keep),),
  )
  return PermutedLayout(q_order, kv_order, q_cluster, kv_cluster, keep, mask)


def _permute(x: jax.Array, order: jax.Array) -> jax.Array:
  """x [B, S, H, D] with x[b, i, h] <- x[b, order[b, h, i], h]."""
  return jnp.take_along_axis(x, jnp.swapaxes(order, 1, 2)[..., None], axis=1)


def permuted_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  *,
  num_q_clusters: int,
  num_kv_clusters: int,
  top_p: float,
  iterations: int = 10,
  block_q: int = 64,
  block_kv: int = 64,
  scale: float | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  return_layout: bool = False,
) -> jax.Array | tuple[jax.Array, PermutedLayout]:
  """Attention between semantically similar tokens: clustered, permuted, block-sparse.

  See the module docstring. Equal to dense attention under the mask "query i sees key j
  iff (cluster(i), cluster(j)) is kept" (`PermutedLayout.keep`), computed by
  `block_sparse_attention` on the permuted tokens (skipping the tiles of unkept pairs).

  Args:
    q, k, v: as `block_sparse_attention`'s (GQA allowed).
    num_q_clusters, num_kv_clusters: k-means clusters per query head / kv head.
    top_p: the score mass of key clusters each query cluster keeps, in (0, 1].
    iterations: Lloyd iterations of the clustering.
    block_q, block_kv: the tiles of the permuted block-sparse attention.
    scale: softmax scale (also of the centroid scores), default head_dim ** -0.5.
    implementation, interpret: the attention's (as `block_sparse_attention`) and the
      clustering's (as `ops.kmeans`).
    return_layout: also return the `PermutedLayout` (orders, clusters, mask).

  Returns:
    [batch, q_len, q_heads, v_head_dim] in q's dtype (and the layout).
  """
  checks.check_qkv(q, k, v, _OP)
  layout = permuted_layout(
    q, k, num_q_clusters=num_q_clusters, num_kv_clusters=num_kv_clusters, top_p=top_p,
    iterations=iterations, block_q=block_q, block_kv=block_kv, scale=scale,
    kmeans_implementation=_kmeans_implementation(implementation), interpret=interpret,
  )  # fmt: skip
  out = block_sparse_attention(
    _permute(q, layout.q_order), _permute(k, layout.kv_order), _permute(v, layout.kv_order),
    layout.mask, scale=scale, implementation=implementation, interpret=interpret,
  )  # fmt: skip
  inverse = jnp.argsort(layout.q_order, axis=-1).astype(jnp.int32)  # token -> position
  out = _permute(out, inverse)
  return (out, layout) if return_layout else out


def _kmeans_implementation(attention_implementation: Any) -> str | None:
  """The clustering follows the attention: a named kernel's platform, else the default."""
  return {"reference": "reference", "xla": "xla"}.get(attention_implementation)


__all__ = ["PermutedLayout", "permuted_attention", "permuted_layout"]
