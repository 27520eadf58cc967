r"""Demo: build block masks, run block-sparse attention, compare with dense.

For a few masks (causal, causal sliding window, window + rotating anchors,
top-k tiles from pooled scores) it prints the mask, the largest error of the
block-sparse xla path against the float32 reference, and its speed against
dense XLA attention given the same mask as a dense boolean array, all on
this machine in one run.

  python bench/demo.py [--seq=4096] [--heads=8] [--head_dim=64]
"""

from __future__ import annotations

import benchutil
import jax
import jax.numpy as jnp
from absl import app, flags

from sparse_attention.ops import block_sparse_attention, masks, reference_attention

_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Tile size.")


def pooled_topk(q: jax.Array, k: jax.Array, block: int, topk: int) -> masks.BlockMask:
  """Kinetics-style dynamic mask: score tiles by mean-pooled q . k, keep top-k."""
  b, s, h, d = q.shape
  qp = q.reshape(b, s // block, block, h, d).mean(2)
  kp = k.reshape(b, s // block, block, h, d).mean(2)
  scores = jnp.einsum("bihd,bjhd->bhij", qp, kp)
  return masks.topk_blocks(
    scores, topk, block_q=block, block_kv=block, q_len=s, kv_len=s, keep_diagonal=True
  )


def main(argv):
  del argv
  s, h, d, blk = _SEQ.value, _HEADS.value, _HEAD_DIM.value, _BLOCK.value
  if s % blk:
    raise app.UsageError(f"--seq={s} must be a multiple of --block={blk} (pooled scores).")
  print(benchutil.machine())
  q, k, v = benchutil.random_qkv(1, s, h, d, jnp.float32)
  demo_masks = {
    "causal": masks.causal(s, s, block_q=blk, block_kv=blk),
    "causal window 512": masks.sliding_window(
      s, s, window=512, causal=True, block_q=blk, block_kv=blk
    ),
    "window 256 + 4 anchors": masks.window_with_anchors(
      s, s, window=256, num_anchors=4, offset=3, block_q=blk, block_kv=blk
    ),
    "top-4 pooled tiles": pooled_topk(q, k, blk, 4),
  }
  sparse = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, implementation="xla"))
  dense = jax.jit(
    lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
  )
  rows = []
  for name, m in demo_masks.items():
    print(f"\n{name}: {m}")
    dense_mask = m.to_dense()
    err = jnp.max(jnp.abs(sparse(q, k, v, m) - reference_attention(q, k, v, mask=m)))
    t_sparse = benchutil.median_seconds(sparse, q, k, v, m, repeats=3)
    t_dense = benchutil.median_seconds(dense, q, k, v, dense_mask, repeats=3)
    rows.append(
      [
        name,
        f"{m.block_density():.3f}",
        f"{float(err):.1e}",
        f"{t_sparse * 1e3:.1f}",
        f"{t_dense * 1e3:.1f}",
        f"{t_dense / t_sparse:.1f}x",
      ]
    )
    print(
      f"  max |block-sparse - reference| = {float(err):.2e}; "
      f"{t_sparse * 1e3:.1f} ms vs dense {t_dense * 1e3:.1f} ms"
    )
  print(f"\nseq {s}, {h} heads, head_dim {d}, float32, tiles {blk}x{blk}\n")
  print(
    benchutil.format_table(
      ["mask", "tile density", "max error", "block-sparse ms", "dense ms", "speed-up"], rows
    )
  )


if __name__ == "__main__":
  app.run(main)
