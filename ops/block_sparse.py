"""`block_sparse_attention`: the public block-sparse attention op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attention.ops import checks, dispatch, sharding
from sparse_attention.ops.block_mask import BlockMask
from sparse_attention.ops.block_sparse_xla import block_sparse_attention_xla
from sparse_attention.ops.reference import reference_attention
from sparse_attention.pallas_kernels.block_sparse import gpu, mosaic_gpu, tpu
from sparse_attention.pallas_kernels.block_sparse.common import TokenRoutes

IMPLEMENTATIONS = ("reference", "xla", "pallas", *dispatch.KERNELS)

# The Pallas kernels: (check_supported, kernel).
_KERNELS = {
  "pallas_mosaic_gpu": (mosaic_gpu.check_supported, mosaic_gpu.block_sparse_attention_mosaic_gpu),
  "pallas_triton": (gpu.check_supported, gpu.block_sparse_attention_triton),
  "pallas_tpu": (tpu.check_supported, tpu.block_sparse_attention_tpu),
}


def check_kernel(kernel: str, q, k, v, mask, routes=None, score_mod=None) -> None:
  """Raises `Unsupported` if the Pallas kernel `kernel` cannot take this call."""
  _KERNELS[kernel][0](q, k, v, mask, routes, score_mod=score_mod)


def _resolve(
  implementation: str | None, interpret: bool, q, k, v, mask, op: str, routes=None, score_mod=None
) -> str:
  """The concrete implementation to run ("reference", "xla" or a kernel name)."""
  return dispatch.resolve(
    implementation,
    interpret=interpret,
    op=op,
    implementations=IMPLEMENTATIONS,
    check=lambda kernel: check_kernel(kernel, q, k, v, mask, routes, score_mod),
  )


def block_sparse_attention(
  q: jax.Array,  # [batch, q_len, q_heads, head_dim]
  k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
  v: jax.Array,  # [batch, kv_len, kv_heads, v_head_dim]
  mask: BlockMask,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  return_lse: bool = False,
  interpret: bool = False,
  routes: TokenRoutes | None = None,
  row_scale: jax.Array | None = None,
  score_mod: Callable | None = None,
  score_mod_params: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention over the tiles a `BlockMask` keeps; every other tile is skipped.

  Dense attention is `masks.dense(...)`: the same path with every tile kept.

  Args:
    q, k, v: `[batch, seq, heads, head_dim]`, one dtype (float32, bfloat16 or
      float16). k/v heads must divide q heads (GQA/MQA; never repeated in
      memory). v's head_dim may differ from q/k's.
    mask: a `BlockMask` for exactly (q_len, kv_len); its batch/head dims are 1
      or match q's (heads are query heads).
    scale: softmax scale, default `head_dim ** -0.5`.
    implementation: None: the first Pallas kernel of the platform that supports
      the call (Hopper GPUs: Mosaic GPU, then Triton; other GPUs: Triton; TPU:
      Mosaic TPU), else "xla" (always on CPU). "reference": the naive O(S^2)
      float32 oracle. "xla": pure JAX, O(S) memory, work proportional to the kept
      tiles, runs everywhere. "pallas": the platform's kernels as for None, but
      never "xla" (on CPU only with interpret=True, which runs the Triton kernel
      interpreted). "pallas_mosaic_gpu" / "pallas_triton" / "pallas_tpu": that
      kernel, whatever the platform (with interpret=True off its hardware).
    return_lse: also return the natural-log logsumexp, float32
      `[batch, q_heads, q_len]`.
    interpret: run a Pallas kernel in the interpreter (the TPU kernel in the
      TPU simulator) instead of compiling it: for tests and debugging on CPU.
    routes: optional per-token routes (`TokenRoutes(query, key)`, query int
      `[B|1, Hr, q_len, R]`, key int `[B|1, kv_len]`): inside the visited tiles,
      query i of head h sees key j only if `key[b, j]` is one of
      `query[b, h // (q_heads // Hr), i]`. MoBA and NSA select key blocks this way.
    row_scale: optional float `[B|1, q_heads|1, q_len]` multiplying each query's
      output (Re-ttention's sparse step: r_i * O^M_i with r from
      `calibrate_attention`); the returned lse stays that of the masked softmax.
    score_mod: optional `score_mod(score, b, h, q_idx, kv_idx) -> score`, or with
      `score_mod_params` given `score_mod(score, b, h, q_idx, kv_idx, params)`
      (FlexAttention's contract): score is the scaled float32 logit q.k * scale, the
      index arguments int32 arrays (batch row, query head, positions) broadcasting
      against it; runs before the mask, in every tile. Softcapping, ALiBi, relative
      position biases. Kernels that cannot lower the function refuse it (None then
      runs "xla").
    score_mod_params: a pytree of arrays the score_mod reads (slopes, a bias table);
      gradients flow to its floating leaves.

  Returns:
    `[batch, q_len, q_heads, v_head_dim]` in q's dtype (and the lse). Queries
    that see no key give 0 and lse -inf, with finite gradients.

  Raises:
    ValueError: on mismatched shapes/dtypes/heads, an unknown implementation,
      or a kernel asked for explicitly that does not support the call, before
      anything is computed.
  """
  op = "block_sparse_attention"
  shape = checks.check_qkv(q, k, v, op)
  checks.check_block_mask(mask, shape, op)
  scale = checks.check_scale(scale, shape, op)
  checks.check_routes(routes, shape, op)
  checks.check_row_scale(row_scale, shape, op)
  mod = checks.check_score_mod(score_mod, score_mod_params, op)
  impl = _resolve(implementation, interpret, q, k, v, mask, op, routes, mod)
  if impl == "reference":
    dense = (
      mask if routes is None else mask.to_dense() & checks.routes_to_dense(routes, shape.q_heads)
    )
    out, lse = reference_attention(
      q, k, v, mask=dense, scale=scale, return_lse=True, score_mod=mod,
      score_mod_params=score_mod_params,
    )  # fmt: skip
  elif impl == "xla":
    out, lse = block_sparse_attention_xla(
      q, k, v, mask, scale=scale, routes=routes, score_mod=mod, score_mod_params=score_mod_params
    )
  else:
    kernel = _KERNELS[impl][1]
    # Under a mesh, each device runs the kernel on its own batch rows and heads.
    out, lse = sharding.shard_over_batch_and_heads(
      kernel, q, k, v, mask, routes, score_mod_params, scale=scale, interpret=interpret,
      score_mod=mod,
    )  # fmt: skip
  if row_scale is not None:
    scale_rows = jnp.swapaxes(jnp.asarray(row_scale, jnp.float32), 1, 2)[..., None]
    out = (out.astype(jnp.float32) * scale_rows).astype(out.dtype)  # [B, Lq, H, Dv]
  return (out, lse) if return_lse else out
