"""Bounded KV caches (models/kv_memory.py): "sinks" and "hierarchical" decode policies.

Exact while nothing left the window (equal to the full forward), equal to a plain
Python simulation of the memory (pooling, pairwise merges, layout positions, the
log-size bias) once things do, constant memory in the decoded length, errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_lm import SMALL

from sparse_attention.models import kv_memory, lm

# max_len 64 leaves room for anchors + compressed + window >= the 40 tokens decoded.
CONFIG = dataclasses.replace(SMALL, attention="dense", max_len=64)
# On an accelerator also the kernels (implementation None: Triton / Mosaic).
IMPLS = ["xla", "reference"] + ([None] if jax.default_backend() != "cpu" else [])


def _model(**overrides) -> lm.LM:
  return lm.LM(dataclasses.replace(CONFIG, **overrides), rngs=nnx.Rngs(0))


@jax.jit
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _teacher_forced(graphdef, state, tokens, prompt, policy):
  """Logits of tokens[:, :prompt] (one decode call), then one token at a time."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], policy=policy)
  first, cache = model.decode(tokens[:, :prompt], cache)

  def step(cache, token):
    logits, cache = model.decode(token[:, None], cache)
    return cache, logits[:, 0]

  cache, rest = jax.lax.scan(step, cache, tokens[:, prompt:].T)
  return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1), cache


POLICIES = {
  "sinks": lm.DecodePolicy("sinks", anchors=4, window=26),
  "hierarchical": lm.DecodePolicy(
    "hierarchical", anchors=2, compressed_blocks=3, window=30, block_size=4
  ),
}


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("kind", POLICIES)
def test_equal_to_the_full_cache_while_the_window_holds_everything(kind, implementation):
  model = _model(implementation=implementation)
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, CONFIG.vocab_size)
  graphdef, state = nnx.split(model)
  full = _forward(graphdef, state, tokens)
  policy = POLICIES[kind]
  a, _, w, bs = kv_memory.geometry(policy)
  exact = a + w + bs - 1  # the first token that makes a block leave the window
  for prompt in (5, 20) if implementation == "xla" else (20,):  # prefill of 1 or many tokens
    cached, cache = _teacher_forced(graphdef, state, tokens, prompt, policy)
    assert int(cache.length) == 40
    np.testing.assert_allclose(cached[:, :exact], full[:, :exact], atol=2e-5, rtol=2e-5)
  assert np.all(np.isfinite(cached))
  assert not np.allclose(cached[:, exact:], full[:, exact:], atol=1e-3)


def _simulate(q, k, v, policy, theta):
  """Plain Python reference of one layer's bounded attention: q [n, Hq, D], k, v [n,
  Hkv, D] (unrotated) -> [n, Hq, D]."""
  a, c, w, bs = kv_memory.geometry(policy)
  anchors, slots, window, out = [], [], [], []  # slots: [k, v, tokens]

  def rope(x, p):  # x [H, D] at position p
    return np.asarray(lm.rope(jnp.asarray(x)[None, None], jnp.full((1, 1), p), theta))[0, 0]

  g = q.shape[1] // k.shape[1]
  for t in range(q.shape[0]):
    if t < a:
      anchors.append((k[t], v[t]))
    else:
      if len(window) == w + bs - 1:  # the oldest block leaves the window
        block, window = window[:bs], window[bs:]
        if c:
          new = [np.mean([x[0] for x in block], 0), np.mean([x[1] for x in block], 0), bs]
          if len(slots) == c:
            ext = slots + [new]
            sizes = [x[2] for x in ext]
            pairs = [(sizes[i] + sizes[i + 1], i) for i in range(c) if sizes[i] == sizes[i + 1]]
            _, i = min(pairs or [(0, 0)])  # no equal pair: the two oldest
            (ka, va, na), (kb, vb, nb) = ext[i], ext[i + 1]
            merged = [(na * ka + nb * kb) / (na + nb), (na * va + nb * vb) / (na + nb), na + nb]
            slots = ext[:i] + [merged] + ext[i + 2 :]
          else:
            slots.append(new)
      window.append((k[t], v[t]))
    entries = [(x, y, 1) for x, y in anchors] + [tuple(s) for s in slots]
    entries += [(x, y, 1) for x, y in window]
    keys = np.stack([rope(e[0], p) for p, e in enumerate(entries)])  # [E, Hkv, D]
    vals = np.stack([e[1] for e in entries])
    bias = np.log([e[2] for e in entries]) if policy.pooled_bias else np.zeros(len(entries))
    qt = rope(q[t], len(entries) - 1)  # [Hq, D]
    kh, vh = np.repeat(keys, g, axis=1), np.repeat(vals, g, axis=1)  # [E, Hq, D]
    s = np.einsum("hd,ehd->he", qt, kh) / np.sqrt(q.shape[-1]) + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out.append(np.einsum("he,ehd->hd", p, vh))
  return np.stack(out)


@pytest.mark.parametrize(
  "policy",
  [
    lm.DecodePolicy("sinks", anchors=3, window=8),
    lm.DecodePolicy("hierarchical", anchors=2, compressed_blocks=3, window=6, block_size=2),
    lm.DecodePolicy(
      "hierarchical", anchors=0, compressed_blocks=1, window=5, block_size=3, pooled_bias=True
    ),
  ],
  ids=["sinks", "hierarchical", "one-slot-size-bias"],
)
def test_one_layer_equals_a_python_simulation_of_the_memory(policy):
  model = _model()
  attn = model.blocks[0].attn
  c = model.config
  n = 45  # many pools and merges (and past every row count)
  x = jax.random.normal(jax.random.key(2), (1, n, c.dim))
  cache = model.init_cache(1, policy=policy).layers[0]
  y, new = kv_memory.decode(attn, x[:, :7], cache, jnp.int32(0), policy)  # a chunk,
  y2, new = kv_memory.decode(attn, x[:, 7:], new, jnp.int32(7), policy)  # then the rest
  y = jnp.concatenate([y, y2], axis=1)
  q = np.asarray(attn.wq(x).reshape(n, c.num_heads, c.head_dim))
  k = np.asarray(attn.wk(x).reshape(n, c.num_kv_heads, c.head_dim))
  v = np.asarray(attn.wv(x).reshape(n, c.num_kv_heads, c.head_dim))
  o = _simulate(q, k, v, policy, c.rope_theta)
  expected = attn.wo(jnp.asarray(o.reshape(1, n, -1), jnp.float32))
  np.testing.assert_allclose(y, expected, atol=2e-5, rtol=2e-5)
  if policy.kind == "hierarchical":  # every pooled token is in a slot
    a, _, w, bs = kv_memory.geometry(policy)
    assert int(jnp.sum(new.counts)) == bs * ((n - a - w) // bs)


def test_slot_sizes_grow_with_age():
  policy = lm.DecodePolicy("hierarchical", anchors=1, compressed_blocks=5, window=4, block_size=2)
  model = _model(depth=1)
  tokens = jax.random.randint(jax.random.key(3), (1, 4 * CONFIG.max_len), 0, CONFIG.vocab_size)
  graphdef, state = nnx.split(model)
  _, cache = _teacher_forced(graphdef, state, tokens, 1, policy)
  sizes = np.asarray(cache.layers[0].counts) // 2  # blocks per slot, oldest first
  assert sizes.sum() == (tokens.shape[1] - 1 - 4) // 2
  assert np.all(sizes[:-1] >= sizes[1:]) and sizes[-1] <= 2, sizes  # 125 blocks > 2^5 - 1


@pytest.mark.parametrize("kind", POLICIES)
def test_memory_is_constant_in_the_decoded_length(kind):
  policy = POLICIES[kind]
  model = _model()
  graphdef, state = nnx.split(model)
  empty = model.init_cache(2, policy=policy)
  small = model.init_cache(2, 8, policy=policy)  # max_len does not size a bounded cache
  assert kv_memory.cache_bytes(empty) == kv_memory.cache_bytes(small)
  shapes = lambda cache: [x.shape for x in jax.tree.leaves(cache)]
  length = 3 * CONFIG.max_len  # past max_len: RoPE positions stay < the rows
  tokens = jax.random.randint(jax.random.key(4), (2, length), 0, CONFIG.vocab_size)
  logits, cache = _teacher_forced(graphdef, state, tokens, 8, policy)
  assert int(cache.length) == length and np.all(np.isfinite(logits))
  assert shapes(cache) == shapes(empty)
  assert kv_memory.cache_bytes(cache) == kv_memory.cache_bytes(empty)
  exact = model.init_cache(2)  # the full cache grows with max_len
  assert kv_memory.cache_bytes(model.init_cache(2, 32)) < kv_memory.cache_bytes(exact)
  prompt = jnp.zeros((2, 4), jnp.int32)
  out = model.generate(prompt, CONFIG.max_len + 8, rng=jax.random.key(0), policy=policy)
  assert out.shape == (2, CONFIG.max_len + 12)
  with pytest.raises(ValueError, match="exceeds max_len"):
    model.generate(prompt, CONFIG.max_len + 8, rng=jax.random.key(0))


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(kind="sinks", window=0), "DecodePolicy.window must be an int >= 1"),
    (dict(kind="sinks", anchors=-1), "DecodePolicy.anchors must be an int >= 0"),
    (dict(kind="hierarchical", compressed_blocks=0), "DecodePolicy.compressed_blocks must be"),
    (dict(kind="hierarchical", pooled_bias=1), "DecodePolicy.pooled_bias must be a bool"),
    (dict(kind="sinks", window=62), r"DecodePolicy.window: anchors \+ window = 66 cache rows"),
    (dict(kind="hierarchical", window=40, block_size=8), "exceed the model's max_len 64"),
  ],
)
def test_policy_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model().init_cache(1, policy=lm.DecodePolicy(**overrides))


def test_bounded_policies_need_dense_attention():
  with pytest.raises(ValueError, match="DecodePolicy.kind='sinks' needs attention='dense'"):
    _model(attention="moba").init_cache(1, policy=lm.DecodePolicy("sinks", window=8))
  with pytest.raises(ValueError, match="DecodePolicy.kind='hierarchical' needs attention="):
    _model(score_mod="alibi").generate(
      jnp.zeros((1, 2), jnp.int32), 2, rng=jax.random.key(0),
      policy=lm.DecodePolicy("hierarchical", window=8),
    )  # fmt: skip
