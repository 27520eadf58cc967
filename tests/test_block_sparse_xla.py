"""The xla block-sparse path against the reference: outputs, lse, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testutil

from sparse_attention.ops import block_sparse_attention, block_sparse_xla, masks
from sparse_attention.ops.block_sparse_xla import block_sparse_attention_xla

Q_LEN, KV_LEN = testutil.Q_LEN, testutil.KV_LEN
MASKS = testutil.mask_cases()
_layout = testutil.random_layout


@pytest.fixture
def three_tiles_per_chunk(monkeypatch):
  """Chunks of 3 tiles, so rows straddle chunks and the online merge runs."""
  monkeypatch.setattr(block_sparse_xla, "_CHUNK_SCORES", 3 * 32 * 16)


@pytest.mark.usefixtures("three_tiles_per_chunk")
@pytest.mark.parametrize("name", list(MASKS))
def test_every_builder_f32_gqa(name):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 4, 2, 16, 8, seed=hash(name) % 1000)
  testutil.assert_matches_reference(q, k, v, MASKS[name], "xla", what=name)


@pytest.mark.parametrize(
  "name", ["causal", "window_with_anchors", "layout_per_batch_head", "causal_empty_rows"]
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(name, dtype):
  q, k, v = testutil.qkv(2, Q_LEN, KV_LEN, 4, 4, 32, dtype=dtype)
  testutil.assert_matches_reference(q, k, v, MASKS[name], "xla", what=name)


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (4, 1), (6, 3)])
@pytest.mark.parametrize("block_q, block_kv", [(16, 16), (64, 32), (8, 128)])
def test_gqa_and_block_sizes(q_heads, kv_heads, block_q, block_kv):
  q, k, v = testutil.qkv(1, 77, 130, q_heads, kv_heads, 8, 12)
  m = masks.from_layout(
    _layout(1, q_heads, 77, 130, block_q, block_kv, 0.5, seed=q_heads),
    block_q=block_q,
    block_kv=block_kv,
    q_len=77,
    kv_len=130,
  )
  testutil.assert_matches_reference(q, k, v, m, "xla", what=f"{block_q}x{block_kv}")


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunk_boundaries(chunk):
  """Rows whose tiles straddle chunk boundaries merge exactly once."""
  q, k, v = testutil.qkv(1, 64, 64, 2, 2, 8)
  m = masks.from_layout(
    _layout(1, 2, 64, 64, 8, 8, 0.5, seed=4), block_q=8, block_kv=8, q_len=64, kv_len=64
  )
  expected = block_sparse_attention(q, k, v, m, implementation="reference", return_lse=True)
  got = block_sparse_attention_xla(q, k, v, m, scale=8**-0.5, chunk=chunk)
  for a, e in zip(got, expected, strict=True):
    testutil.assert_close(a, e, jnp.float32, "out")


def test_fully_empty_mask():
  q, k, v = testutil.qkv(1, 40, 40, 2, 2, 8)
  m = masks.from_layout(np.zeros((1, 1, 3, 3), bool), block_q=16, block_kv=16, q_len=40, kv_len=40)
  out, lse, grads = testutil.outputs_and_grads(q, k, v, m, "xla")
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  for g in grads:
    assert (np.asarray(g) == 0).all()


def test_implementation_none_is_xla_on_cpu():
  q, k, v = testutil.qkv(1, 64, 64, 2, 2, 8)
  m = masks.causal(64, 64, block_q=16, block_kv=16)
  a = block_sparse_attention(q, k, v, m)
  b = block_sparse_attention(q, k, v, m, implementation="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_new_mask_values_do_not_retrace():
  q, k, v = testutil.qkv(1, 128, 128, 2, 2, 8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attend(q, k, v, layout):
    m = masks.from_layout(layout, block_q=32, block_kv=32, q_len=128, kv_len=128)
    return block_sparse_attention(q, k, v, m)

  for seed in range(3):
    layout = jnp.asarray(_layout(1, 2, 128, 128, 32, 32, 0.5, seed=seed))
    expected = block_sparse_attention(
      q,
      k,
      v,
      masks.from_layout(layout, block_q=32, block_kv=32, q_len=128, kv_len=128),
      implementation="reference",
    )
    testutil.assert_close(attend(q, k, v, layout), expected, jnp.float32, "out")

  # A BlockMask passed as an argument also changes without retracing.
  attend_mask = jax.jit(
    chex.assert_max_traces(lambda q, k, v, m: block_sparse_attention(q, k, v, m), n=1)
  )
  for offset in range(3):
    attend_mask(
      q,
      k,
      v,
      masks.window_with_anchors(
        128, 128, window=8, num_anchors=1, offset=jnp.int32(offset), block_q=32, block_kv=32
      ),
    )


def _temp_bytes(seq_len: int) -> int:
  q = jax.ShapeDtypeStruct((1, seq_len, 4, 32), jnp.float32)
  m = masks.sliding_window(seq_len, seq_len, window=128, block_q=64, block_kv=64)
  f = jax.jit(lambda q, m: block_sparse_attention(q, q, q, m))
  return f.lower(q, m).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_with_sequence():
  small, large = _temp_bytes(2048), _temp_bytes(8192)
  assert large < 5 * small, (small, large)  # O(S^2) would be 16x


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(implementation="pallas_v9"), "implementation"),
    (dict(mask=masks.causal(64, 65, block_q=16, block_kv=16)), "kv_len=65"),
    (
      dict(
        mask=masks.from_layout(
          np.ones((3, 1, 4, 4), bool), block_q=16, block_kv=16, q_len=64, kv_len=64
        )
      ),
      "batch/heads",
    ),
    (dict(mask=np.ones((1, 1, 64, 64), bool)), "must be a BlockMask"),
    (dict(scale=jnp.float32(0.5)), "scale"),
  ],
)
def test_bad_inputs_raise(kwargs, match):
  q, k, v = testutil.qkv(2, 64, 64, 2, 2, 8)
  args = dict(mask=masks.causal(64, 64, block_q=16, block_kv=16))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, **args)
