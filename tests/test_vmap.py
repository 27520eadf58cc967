"""`jax.vmap` over the ops' implementations.

Pallas batches a kernel by adding a grid axis, which the Triton kernels take and the TPU
kernels' dimension semantics and scalar-prefetch index maps do not: the TPU kernels fold
the mapped axis into their batch instead (a `custom_vmap` rule). Either way, every
implementation under vmap must match the reference per example, gradients included.
"""

import jax
import jax.numpy as jnp
import pytest
import testutil

from sparse_attention.ops import block_sparse_attention, calibrate_attention, masks, moba_attention
from sparse_attention.pallas_kernels.block_sparse import tpu

IMPLEMENTATIONS = ["xla", "pallas_triton", "pallas_tpu"]
N, B, S, HQ, HKV, D = 3, 2, 64, 4, 2, 16  # vmap over N, each example [B, S, H, D]
GEO = dict(block_q=16, block_kv=32)


def _inputs(n=N, seed=0):
  """q, k, v with a leading mapped axis: [n, B, S, H, D]."""
  q, k, v = testutil.qkv(n * B, S, S, HQ, HKV, D, seed=seed)
  return tuple(x.reshape(n, B, *x.shape[1:]) for x in (q, k, v))


MASKS = {
  "causal": masks.causal(S, S, **GEO),  # partial tiles (mask_fn), broadcast over the batch
  "layout_per_batch": masks.from_layout(  # a batch dim (Bm = B), full tiles only
    testutil.random_layout(B, HQ, S, S, 16, 32, 0.4, seed=3), q_len=S, kv_len=S, **GEO
  ),
}


def _assert_close(got, want, kind: str, what: str):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    testutil.assert_close(g, w, jnp.float32, kind, what)


def _attend(implementation, mask):
  return lambda q, k, v: block_sparse_attention(
    q, k, v, mask, implementation=implementation, interpret=True, return_lse=True
  )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(MASKS))
def test_vmap_outputs_and_gradients_match_reference(name, implementation):
  """vmap of (outputs, grad): the forward and backward kernels batched."""
  mask = MASKS[name]
  per_example = lambda impl: jax.vmap(
    lambda q, k, v: testutil.outputs_and_grads(q, k, v, mask, impl, interpret=True)
  )
  out, lse, grads = per_example(implementation)(*_inputs())
  r_out, r_lse, r_grads = per_example("reference")(*_inputs())
  _assert_close(out, r_out, "out", "out")
  _assert_close(lse, r_lse, "lse", "lse")
  _assert_close(grads, r_grads, "grad", "dq, dk, dv")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grad_of_vmap_with_a_mapped_mask(implementation):
  """Each example its own mask (anchors rotated by a mapped offset: batched mask arrays
  and partial tiles), under jit, differentiated through the vmap."""

  def loss(impl, q, k, v, offsets):
    def one(q, k, v, offset):
      mask = masks.window_with_anchors(S, S, window=8, num_anchors=1, offset=offset, **GEO)
      out, lse = _attend(impl, mask)(q, k, v)
      return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    out, lse = jax.vmap(one)(q, k, v, offsets)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(lse**2), (out, lse)

  offsets = jnp.arange(N)
  run = lambda impl: jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)(
    impl, *_inputs(seed=1), offsets
  )
  grads, outs = run(implementation)
  r_grads, r_outs = run("reference")
  _assert_close(outs, r_outs, "out", "out, lse")
  _assert_close(grads, r_grads, "grad", "dq, dk, dv")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nested_vmap(implementation):
  q, k, v = (x.reshape(2, 2, *x.shape[1:]) for x in _inputs(n=4, seed=2))
  nested = lambda impl: jax.vmap(jax.vmap(_attend(impl, MASKS["causal"])))(q, k, v)
  _assert_close(nested(implementation), nested("reference"), "lse", "out, lse")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_of_calibration(implementation):
  mask = masks.window_with_anchors(S, S, window=8, num_anchors=1, **GEO)
  calibrate = lambda impl: jax.vmap(
    lambda q, k, v: calibrate_attention(q, k, v, mask, implementation=impl, interpret=True)
  )(*_inputs(seed=3))
  got, want = calibrate(implementation), calibrate("reference")
  _assert_close((got.out, got.out_masked), (want.out, want.out_masked), "out", "out, O^M")
  _assert_close((got.lse, got.lse_masked), (want.lse, want.lse_masked), "lse", "lse, lse_M")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_of_moba_mapped_token_routes(implementation):
  """MoBA's routes come from q and k, so under vmap they are mapped too."""
  moba = lambda impl: jax.vmap(
    lambda q, k, v: moba_attention(
      q, k, v, chunk_size=16, topk=2, implementation=impl, interpret=True, block_q=16, block_kv=16
    )
  )(*_inputs(seed=4))
  _assert_close(moba(implementation), moba("reference"), "out", "moba out")


@pytest.mark.parametrize("mapped_mask", [False, True])
def test_vmap_of_remat_lowers_to_one_call_per_tpu_kernel(mapped_mask):
  """The folding rule is a custom_vmap inside the kernel's custom_vjp; under vmap, with
  jax.checkpoint (partial evaluation) around it, each kernel is ONE call over N x B rows,
  also where each example has its own mask (Pallas's own rule would loop over them).
  (The TPU simulator's callbacks are effects that remat refuses, so this lowers for a
  TPU instead of running.)"""
  q, k, v = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs())

  def loss(q, k, v, offset):
    mask = masks.window_with_anchors(S, S, window=8, num_anchors=1, offset=offset, **GEO)
    out, _ = tpu.block_sparse_attention_tpu(q, k, v, mask, scale=0.25)
    return jnp.sum(out**2)

  grad = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))
  fn = jax.vmap(grad, in_axes=(0, 0, 0, 0 if mapped_mask else None))
  offset = jax.ShapeDtypeStruct((N,) if mapped_mask else (), jnp.int32)
  text = jax.jit(fn).trace(q, k, v, offset).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv
  assert "stablehlo.while" not in text
  assert f"tensor<{N * B}x{HQ}x{S}x{D}xf32>" in text  # [N * B, H, S, D]: folded
