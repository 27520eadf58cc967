"""A decoder-only language model in Flax NNX with dense, sliding-window, MoBA or NSA attention.

Structure (Llama-style, pre-norm):

```
LM(tokens [B, L] int, segment_ids [B, L] | None) -> logits [B, L, vocab_size] float32
  embed        nnx.Embed(vocab_size, dim)
  blocks.N     Block, N = 0 .. depth - 1
                 x = x + attn(norm1(x))   Attention: GQA (num_heads query heads share
                                          num_kv_heads k/v heads), RoPE on q and k
                 x = x + mlp(norm2(x))    SwiGLU: w2(silu(w1 x) * w3 x)
  norm         RMSNorm
  head         Linear(dim, vocab_size), untied from the embedding
```

The output head is untied: the byte-level presets lose nothing by it (256 x dim
parameters) and the embedding keeps its own initialisation scale.

`config.attention` picks what each query attends to (every kind is causal):

* "dense": all earlier keys, through `ops.block_sparse_attention` with `masks.causal`
  rather than `jax.nn.dot_product_attention(is_causal=True)`: it is this library's op,
  so the model runs the Pallas kernels on GPU/TPU and, on CPU, the xla path whose
  memory grows with the sequence, not its square; dense and sliding share one code
  path (only the BlockMask differs); and cached decoding needs a traced mask (the
  op's token routes), which `jax.nn.dot_product_attention` has no cheap form for.
* "sliding": keys i - window .. i (window + 1 keys), `masks.sliding_window(causal=True)`.
* "moba": `ops.moba.moba_attention(chunk_size=moba_chunk, topk=moba_topk)`.
* "nsa": `ops.nsa.nsa_attention`. The compressed keys/values come from NSA's phi
  (`nsa_compress="mlp"`: every compressed block's nsa_block_len keys plus a learned
  intra-block position embedding [l, Hkv, D], flattened per kv head and mapped to one
  key by a 2-layer SiLU MLP shared by the heads; separate phi for keys and values;
  `"mean"`: `ops.nsa.compress_mean`). phi reads the rotated (RoPE) keys, because the
  op scores the compressed keys against the same rotated queries as the other
  branches. Gates g = sigmoid(Linear(x)) [B, L, Hq, 3] from the block's normed input.

Packed sequences: `segment_ids` (non-negative ints, a segment = a maximal run of equal
ids) keep attention inside each segment and restart the RoPE positions at each
segment start (MoBA's chunks restart there too). NSA restarts its block grids there as
well: phi compresses each segment's own blocks (`ops.nsa.compressed_blocks` /
`compress_mean` with segment_ids, in `ops.nsa.compressed_slots`' layout) and
`nsa_attention` gets the segment_ids, so every segment, wherever it starts, behaves
exactly as a separate sequence.

KV-cached decoding (`init_cache`, `decode`, `generate`): the cache holds, per layer,
fixed-size k/v arrays [B, max_len, Hkv, D] written left-aligned (position t at row t)
plus one int32 length; shapes never change, so a jitted step compiles once. Per kind:

* dense / sliding: `ops.decode_attention` reads the left-aligned cache itself, with
  the fill level as traced data: only the tiles up to the newest token (and, sliding,
  back to the window) are visited, so a step costs O(length), not O(max_len).
* MoBA and NSA, steps of up to `DECODE_MAX_NEW` tokens (generation): the ops of
  `ops/sparse_decoding.py` read the left-aligned cache with the fill level as data, so
  a step costs what the method needs, not O(max_len): MoBA gates the cached chunk
  mean keys (k_gate [B, ceil(max_len / chunk), Hkv, D]) and attends its top-k chunks'
  keys only; NSA attends the cached compressed blocks (k_cmp / v_cmp [B, Nc(max_len),
  Hkv, D]), gathers its selected blocks and runs the window through
  `decode_attention`. The summaries are updated incrementally: a step runs phi (the
  mean, for MoBA) on the blocks that became complete (at most n // stride + 1).
* MoBA and NSA, longer steps (prefill): the full op over a frame of max_len rows.
  MoBA's frame is the cache "right-aligned" (row f is position length + n - F + f,
  gathered; F = max_len), the rows before position 0 hidden by segment_ids (0 =
  unwritten, 1 = the sequence), which also restarts the chunk grid at position 0.
  NSA's frame is the left-aligned cache, the new queries (and gates) at their rows of
  a zero [B, max_len, Hq, *] array: every branch is causal in the query's position,
  so rows not yet written are never seen.

Bounded caches (`DecodePolicy("sinks" | "hierarchical")`, dense attention): a fixed-size
memory of anchors (+ pooled blocks) + a recent window with RoPE positions taken in the
cache's layout, so decoding goes on past max_len at a constant cost per token
(`models/kv_memory.py`).

Context parallelism (`LM(tokens, layout=SequenceLayout)`, what the trainer does on a mesh
with a `context` axis): the sequence is stored in the layout's order, zig-zag over the
devices (ops/context_parallel.py). The tokens are permuted once at the input, RoPE
gets the stored positions, embeddings / norms / MLPs / the head run on each device's
slices, and every attention kind runs as a ring over the context axis (dense and
sliding as element masks, MoBA and NSA through their context-parallel ops; NSA's phi
runs on the blocks each device cuts from its slices). The logits come back in the
stored order: permute the targets with `layout.to_layout`. No segment_ids.

Exactness: a cached step computes, for every new token, the same keys, blocks,
selection and softmax as the full forward; only the floating-point summation order of
the attention can differ (other tiles), which is within float32 round-off
(tests/test_lm.py checks logits step by step for every kind).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention.ops import (
  BLOCK_SPARSE_IMPLEMENTATIONS,
  MOBA_IMPLEMENTATIONS,
  NSA_IMPLEMENTATIONS,
  TokenRoutes,
  block_sparse_attention,
  block_topk_decode_attention,
  check_values_in_range,
  compress_mean,
  compressed_blocks,
  decode_attention,
  element_masks,
  masks,
  moba_attention,
  moba_decode_attention,
  nsa_attention,
  nsa_decode_attention,
  num_compressed_blocks,
  score_mods,
)
from sparse_attention.ops import context_parallel as cp

ATTENTIONS = ("dense", "sliding", "moba", "nsa")
NSA_COMPRESS = ("mlp", "mean")
SCORE_MODS = ("softcap", "alibi", "t5")
# MoBA and NSA decode steps of up to this many new tokens run the decoding ops (cost set
# by the selection); longer ones (prefill) run the full op over the cache.
DECODE_MAX_NEW = 16
DTYPES = ("float32", "bfloat16", "float16")
# Implementations each attention kind's op accepts (None: the best available).
_IMPLEMENTATIONS = {
  "dense": BLOCK_SPARSE_IMPLEMENTATIONS,
  "sliding": BLOCK_SPARSE_IMPLEMENTATIONS,
  "moba": MOBA_IMPLEMENTATIONS,
  "nsa": NSA_IMPLEMENTATIONS,
}


# ---------------------------------------------------------------------------- config


class LMConfigError(ValueError):
  """A bad `LMConfig` field; `field` names it (the training task maps it to config.model)."""

  def __init__(self, field: str, detail: str):
    super().__init__(f"LMConfig.{field} {detail}")
    self.field = field
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The language model's shape and attention.

  Attributes:
    vocab_size: tokens (256 for bytes).
    dim: model width.
    depth: number of blocks.
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (GQA); divides num_heads.
    head_dim: D per head (even: RoPE rotates pairs).
    mlp_hidden: SwiGLU hidden width.
    max_len: the longest sequence `__call__`, `init_cache` and `generate` accept
      (RoPE is computed on the fly; nothing is sized by it).
    rope_theta: RoPE base.
    attention: "dense" | "sliding" | "moba" | "nsa".
    window: sliding: query i sees keys i - window .. i.
    moba_chunk, moba_topk: MoBA's chunk size and chunks per query (own one included).
    nsa_block_len, nsa_stride: NSA compressed blocks [c*stride, c*stride + block_len).
    nsa_select_len, nsa_num_select: selection block length l' and blocks per query n.
    nsa_window: NSA's sliding branch: keys t - nsa_window < j <= t.
    nsa_compress: NSA's phi: "mlp" (learned, as the paper) or "mean" (mean pooling).
    nsa_compress_hidden: hidden width of the phi MLP.
    block_size: tile size of the dense / sliding BlockMasks.
    score_mod: None, or a modification of the attention scores (dense / sliding only;
      the ops' `score_mod`, in the full forward and in decoding): "softcap" (Gemma 2:
      softcap * tanh(s / softcap)), "alibi" (s - slope_h * |i - j|, learned slopes per
      head, initialised to ALiBi's geometric ones) or "t5" (s + table[bucket(i - j), h],
      a learned table per block over T5's causal log-spaced distance buckets).
    softcap: the softcap value.
    t5_buckets, t5_max_distance: T5's buckets (half exact distances, half log-spaced up
      to t5_max_distance; farther shares the last).
    rope: rotate q and k by RoPE (off for position information from the score_mod only).
    implementation: passed to the attention op; None = best available.
    dtype: compute dtype ("float32", "bfloat16", "float16"); None follows the
      parameters (the trainer casts them for mixed precision).
    param_dtype: parameter dtype.
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 256
  dim: int = 128
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_hidden: int = 384
  max_len: int = 256
  rope_theta: float = 10000.0
  attention: str = "dense"
  window: int = 64
  moba_chunk: int = 32
  moba_topk: int = 3
  nsa_block_len: int = 16
  nsa_stride: int = 8
  nsa_select_len: int = 32
  nsa_num_select: int = 4
  nsa_window: int = 64
  nsa_compress: str = "mlp"
  nsa_compress_hidden: int = 64
  block_size: int = 64
  score_mod: str | None = None
  softcap: float = 30.0
  t5_buckets: int = 32
  t5_max_distance: int = 128
  rope: bool = True
  implementation: str | None = None
  dtype: str | None = None
  param_dtype: str = "float32"
  norm_eps: float = 1e-6

  def __post_init__(self):
    def integer(name: str, minimum: int) -> None:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LMConfigError(name, f"must be an int >= {minimum}, got {value!r}.")

    for name in (
      "vocab_size",
      "dim",
      "depth",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_hidden",
      "max_len",
      "window",
      "moba_chunk",
      "moba_topk",
      "nsa_block_len",
      "nsa_stride",
      "nsa_select_len",
      "nsa_window",
      "nsa_compress_hidden",
      "block_size",
      "t5_max_distance",
    ):
      integer(name, 1)
    integer("t5_buckets", 4)
    integer("nsa_num_select", 3)  # NSA forces the initial and 2 local blocks
    if self.head_dim % 2:
      raise LMConfigError("head_dim", f"must be even (RoPE rotates pairs), got {self.head_dim}.")
    if self.num_heads % self.num_kv_heads:
      raise LMConfigError(
        "num_kv_heads", f"({self.num_kv_heads}) must divide num_heads ({self.num_heads})."
      )
    if self.nsa_stride > self.nsa_block_len:
      raise LMConfigError(
        "nsa_stride", f"({self.nsa_stride}) must be <= nsa_block_len ({self.nsa_block_len})."
      )
    theta = self.rope_theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
      raise LMConfigError("rope_theta", f"must be a number > 1, got {theta!r}.")
    eps = self.norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
      raise LMConfigError("norm_eps", f"must be a number > 0, got {eps!r}.")
    if self.attention not in ATTENTIONS:
      raise LMConfigError("attention", f"must be one of {ATTENTIONS}, got {self.attention!r}.")
    if self.score_mod is not None and self.score_mod not in SCORE_MODS:
      raise LMConfigError(
        "score_mod", f"must be None or one of {SCORE_MODS}, got {self.score_mod!r}."
      )
    if self.score_mod is not None and self.attention not in ("dense", "sliding"):
      raise LMConfigError(
        "score_mod",
        f"({self.score_mod!r}) needs attention 'dense' or 'sliding' (moba_attention and "
        f"nsa_attention take no score_mod), got {self.attention!r}.",
      )
    cap = self.softcap
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
      raise LMConfigError("softcap", f"must be a number > 0, got {cap!r}.")
    if self.t5_max_distance <= self.t5_buckets // 2:
      raise LMConfigError(
        "t5_max_distance",
        f"({self.t5_max_distance}) must exceed the {self.t5_buckets // 2} exact buckets "
        "(t5_buckets // 2).",
      )
    if not isinstance(self.rope, bool):
      raise LMConfigError("rope", f"must be a bool, got {self.rope!r}.")
    if self.nsa_compress not in NSA_COMPRESS:
      raise LMConfigError(
        "nsa_compress", f"must be one of {NSA_COMPRESS}, got {self.nsa_compress!r}."
      )
    allowed = _IMPLEMENTATIONS[self.attention]
    if self.implementation is not None and self.implementation not in allowed:
      raise LMConfigError(
        "implementation",
        f"must be None or one of {allowed} for attention={self.attention!r}, got "
        f"{self.implementation!r}.",
      )
    if self.dtype is not None and self.dtype not in DTYPES:
      raise LMConfigError("dtype", f"must be None or one of {DTYPES}, got {self.dtype!r}.")
    if self.param_dtype not in DTYPES:
      raise LMConfigError("param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}.")

  @property
  def compute_dtype(self) -> Any:
    """jnp dtype of the computation, None = the parameters' (nnx's promotion)."""
    return None if self.dtype is None else jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)


def lm_tiny(**overrides: Any) -> LMConfig:
  """Byte-level, ~0.5M parameters: dim 128, 2 blocks, 4 heads / 2 kv heads of 32, seq 256.

  Trains on 2 CPU cores in minutes. Attention sizes for seq 256: window 64, MoBA 8
  chunks of 32 (top 3), NSA blocks 16/8, 8 selection blocks of 32 (top 4), window 64.
  """
  return dataclasses.replace(LMConfig(), **overrides)


def lm_1b(**overrides: Any) -> LMConfig:
  """~1.07B parameters (dense, vocab 32000): dim 2048, 20 blocks, 16 heads / 8 kv heads of
  128 (GQA), SwiGLU 5632, seq 8192.

  MoBA / NSA settings are the papers' for 8K contexts: MoBA chunks of 512, top 3; NSA
  l = 32, d = 16, l' = 64, n = 16, w = 512 (adds ~2.3M parameters per block: phi and
  gates). Sliding window 1024.
  """
  base = LMConfig(
    vocab_size=32000,
    dim=2048,
    depth=20,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    mlp_hidden=5632,
    max_len=8192,
    rope_theta=500000.0,
    window=1024,
    moba_chunk=512,
    moba_topk=3,
    nsa_block_len=32,
    nsa_stride=16,
    nsa_select_len=64,
    nsa_num_select=16,
    nsa_window=512,
    nsa_compress_hidden=256,
    block_size=128,
  )
  return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------------------- layers


def _init(scale: float = 1.0) -> Any:
  return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half layout): x [B, L, H, D], positions int [B|1, L]."""
  half = x.shape[-1] // 2
  freq = jnp.asarray(theta ** (-np.arange(half, dtype=np.float64) / half), jnp.float32)
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B|1, L, D/2]
  cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _score_mod(config: LMConfig):
  """The ops' score_mod of config.score_mod (equal settings give equal, hashable mods:
  jitted calls are not retraced); None without one."""
  if config.score_mod == "softcap":
    return score_mods.Softcap(float(config.softcap))
  if config.score_mod == "alibi":
    return score_mods.alibi
  if config.score_mod == "t5":
    return score_mods.T5Bias(config.t5_buckets, config.t5_max_distance, bidirectional=False)
  return None


def segment_positions(segment_ids: jax.Array | None, length: int) -> jax.Array:
  """int32 [B|1, L]: each token's position in its segment (a maximal run of equal ids)."""
  pos = jnp.arange(length, dtype=jnp.int32)
  if segment_ids is None:
    return pos[None]
  seg = segment_ids.astype(jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return pos - jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)


def context_parallel_problem(config: LMConfig, slice_len: int) -> str:
  """Why the model cannot split its sequence into slices of `slice_len` tokens ("" if
  it can): the ring ops take no score_mod; NSA cuts its compressed blocks from whole
  slices."""
  if config.score_mod is not None:
    return (
      f"score_mod={config.score_mod!r} is not supported with context parallelism (the "
      "ring attention ops take no score_mod)."
    )
  if config.attention != "nsa":
    return ""
  if slice_len % config.nsa_stride or config.nsa_block_len - config.nsa_stride > slice_len:
    return (
      f"NSA needs slices of seq_len / (2 x context) = {slice_len} tokens that are a multiple "
      f"of nsa_stride ({config.nsa_stride}) and at least nsa_block_len - nsa_stride "
      f"({config.nsa_block_len - config.nsa_stride}) long."
    )
  return ""


def _block_q(q_len: int, block_size: int) -> int:
  """Query tile: block_size, or the next power of two >= max(q_len, 16) if smaller."""
  return min(block_size, max(16, 1 << (q_len - 1).bit_length()))


def _right_aligned(x: jax.Array, end: jax.Array, frame: int) -> tuple[jax.Array, jax.Array]:
  """Rows end - frame .. end - 1 of a left-aligned cache x [B, S, H, D] (gathered).

  Returns (x_frame [B, frame, H, D], written bool [frame]); rows before position 0
  repeat row 0 and are marked unwritten.
  """
  pos = end - frame + jnp.arange(frame, dtype=jnp.int32)
  return jnp.take(x, jnp.maximum(pos, 0), axis=1), pos >= 0


class Compressor(nnx.Module):
  """NSA's phi: the keys (or values) of one compressed block -> one key.

  block [B, N, l, Hkv, D] + position embedding [l, Hkv, D] -> per kv head flatten
  [l * D] -> Linear(l * D, hidden) -> SiLU -> Linear(hidden, D) -> [B, N, Hkv, D];
  the MLP is shared by the kv heads, the position embedding is per head.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = config
    self.pos = nnx.Param(
      nnx.initializers.normal(0.02)(
        rngs.params(), (c.nsa_block_len, c.num_kv_heads, c.head_dim), c.params_dtype
      )
    )
    lin = functools.partial(
      nnx.Linear, dtype=c.compute_dtype, param_dtype=c.params_dtype, kernel_init=_init(), rngs=rngs
    )
    self.fc1 = lin(c.nsa_block_len * c.head_dim, c.nsa_compress_hidden)
    self.fc2 = lin(c.nsa_compress_hidden, c.head_dim)

  def __call__(self, blocks: jax.Array) -> jax.Array:
    b, n, l, h, d = blocks.shape
    x = blocks + self.pos[...].astype(blocks.dtype)
    x = x.transpose(0, 1, 3, 2, 4).reshape(b, n, h, l * d)  # [B, N, Hkv, l*D]
    return self.fc2(jax.nn.silu(self.fc1(x))).astype(blocks.dtype)


class Attention(nnx.Module):
  """GQA self-attention with RoPE; the attention kind comes from the config.

  Parameters: wq (dim -> Hq*D), wk, wv (dim -> Hkv*D), wo (Hq*D -> dim), no biases;
  for NSA also `gate` (dim -> Hq*3, with bias) and, with nsa_compress="mlp",
  `k_compress` / `v_compress` (`Compressor`).
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    lin = functools.partial(
      nnx.Linear,
      use_bias=False,
      dtype=c.compute_dtype,
      param_dtype=c.params_dtype,
      kernel_init=_init(),
      rngs=rngs,
    )
    self.wq = lin(c.dim, c.num_heads * c.head_dim)
    self.wk = lin(c.dim, c.num_kv_heads * c.head_dim)
    self.wv = lin(c.dim, c.num_kv_heads * c.head_dim)
    self.wo = lin(c.num_heads * c.head_dim, c.dim, kernel_init=_init(1.0 / (2 * c.depth)))
    nsa_on = c.attention == "nsa"
    self.gate = lin(c.dim, c.num_heads * 3, use_bias=True) if nsa_on else None
    mlp_phi = nsa_on and c.nsa_compress == "mlp"
    self.k_compress = Compressor(c, rngs=rngs) if mlp_phi else None
    self.v_compress = Compressor(c, rngs=rngs) if mlp_phi else None
    # The score_mod's parameters: ALiBi's slopes [Hq] or T5's bias table [buckets, Hq].
    params = None
    if c.score_mod == "alibi":
      params = nnx.Param(jnp.asarray(score_mods.alibi_slopes(c.num_heads), c.params_dtype))
    elif c.score_mod == "t5":
      params = nnx.Param(jnp.zeros((c.t5_buckets, c.num_heads), c.params_dtype))
    self.score_params = nnx.data(params)

  # -- pieces shared by the full forward and decoding

  def _qkv(self, x: jax.Array, positions: jax.Array):
    c = self.config
    b, l, _ = x.shape
    q = self.wq(x).reshape(b, l, c.num_heads, c.head_dim)
    k = self.wk(x).reshape(b, l, c.num_kv_heads, c.head_dim)
    v = self.wv(x).reshape(b, l, c.num_kv_heads, c.head_dim)
    if not c.rope:
      return q, k, v
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def _score_mod(self) -> dict[str, Any]:
    """The ops' score_mod arguments (empty without one)."""
    c = self.config
    mod = _score_mod(c)
    if mod is None:
      return {}
    params = None if self.score_params is None else self.score_params[...]
    return dict(score_mod=mod, score_mod_params=params)

  def _gates(self, x: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    return jax.nn.sigmoid(self.gate(x).reshape(b, l, self.config.num_heads, 3))

  def _phi(self, blocks: jax.Array, compressor: Compressor | None) -> jax.Array:
    """blocks [B, N, l, Hkv, D] -> [B, N, Hkv, D]."""
    if compressor is None:  # mean pooling, as ops.nsa.compress_mean
      return jnp.mean(blocks.astype(jnp.float32), axis=2).astype(blocks.dtype)
    return compressor(blocks)

  def _compress(
    self, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """All complete compressed blocks of k, v [B, L, Hkv, D] -> [B, Nc(L), Hkv, D]; with
    segment_ids, each segment's own blocks in `ops.nsa.compressed_slots`' layout (the
    grid restarts at each segment start; empty slots 0)."""
    c = self.config
    kw = dict(block_len=c.nsa_block_len, stride=c.nsa_stride, segment_ids=segment_ids)
    if self.k_compress is None:
      return compress_mean(k, **kw), compress_mean(v, **kw)
    (k_blocks, valid), (v_blocks, _) = compressed_blocks(k, **kw), compressed_blocks(v, **kw)
    if segment_ids is None:  # every slot holds a block
      return self.k_compress(k_blocks), self.v_compress(v_blocks)
    keep = lambda x: jnp.where(valid[:, :, None, None], x, 0).astype(x.dtype)
    return keep(self.k_compress(k_blocks)), keep(self.v_compress(v_blocks))

  def _nsa(self, q, k, v, k_cmp, v_cmp, gates, segment_ids=None):
    c = self.config
    return nsa_attention(
      q,
      k,
      v,
      k_cmp.astype(q.dtype),
      v_cmp.astype(q.dtype),
      gates.astype(q.dtype),
      segment_ids=segment_ids,
      block_len=c.nsa_block_len,
      stride=c.nsa_stride,
      select_len=c.nsa_select_len,
      num_select=c.nsa_num_select,
      window=c.nsa_window,
      implementation=c.implementation,
    )

  # -- full forward

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    layout: cp.SequenceLayout | None = None,
  ) -> jax.Array:
    """x [B, L, dim] -> [B, L, dim] (with `layout`: the sequence in its stored order)."""
    c = self.config
    b, l, _ = x.shape
    q, k, v = self._qkv(x, positions)  # [B, L, H, D]
    if layout is not None:
      o = self._context_parallel(q, k, v, x, layout)
    elif c.attention in ("dense", "sliding"):
      blocks = dict(block_q=_block_q(l, c.block_size), block_kv=c.block_size)
      if c.attention == "dense":
        mask = masks.causal(l, l, **blocks)
      else:
        mask = masks.sliding_window(l, l, window=c.window, causal=True, **blocks)
      routes = None
      if segment_ids is not None:  # a query sees the keys of its own segment only
        # Routed by each token's segment start, so a reused id is a new segment.
        run = jnp.arange(l, dtype=jnp.int32) - segment_positions(segment_ids, l)  # [B, L]
        routes = TokenRoutes(query=run[:, None, :, None], key=run)
      o = block_sparse_attention(
        q, k, v, mask, routes=routes, implementation=c.implementation, **self._score_mod()
      )
    elif c.attention == "moba":
      o = moba_attention(
        q,
        k,
        v,
        chunk_size=c.moba_chunk,
        topk=c.moba_topk,
        segment_ids=segment_ids,
        implementation=c.implementation,
      )
    else:
      k_cmp, v_cmp = self._compress(k, v, segment_ids)
      o = self._nsa(q, k, v, k_cmp, v_cmp, self._gates(x), segment_ids)
    return self.wo(o.reshape(b, l, c.num_heads * c.head_dim))

  def _context_parallel(self, q, k, v, x, layout: cp.SequenceLayout) -> jax.Array:
    """Attention as a ring over the context axis; q, k, v [B, L, H, D] in stored order."""
    c = self.config
    block = math.gcd(layout.slice_len, c.block_size)
    kw = dict(layout=layout, implementation=c.implementation, block_q=block, block_kv=block)
    if c.attention in ("dense", "sliding"):
      fn = element_masks.Band(None if c.attention == "dense" else -c.window, 0)
      return cp.block_sparse_attention(q, k, v, fn, **kw)
    if c.attention == "moba":
      return cp.moba_attention(q, k, v, chunk_size=c.moba_chunk, topk=c.moba_topk, **kw)
    geometry = dict(block_len=c.nsa_block_len, stride=c.nsa_stride)
    k_cmp = cp.compress(k, self._k_phi, layout=layout, **geometry)
    v_cmp = cp.compress(v, self._v_phi, layout=layout, **geometry)
    return cp.nsa_attention(
      q, k, v, k_cmp.astype(q.dtype), v_cmp.astype(q.dtype), self._gates(x).astype(q.dtype),
      select_len=c.nsa_select_len, num_select=c.nsa_num_select, window=c.nsa_window,
      **geometry, **kw,
    )  # fmt: skip

  # -- cached decoding

  def decode(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache: LayerCache,
    length: jax.Array,
    policy: DecodePolicy | None = None,
  ) -> tuple[jax.Array, LayerCache]:
    """x [B, n, dim] at positions length .. length + n - 1 -> ([B, n, dim], cache)."""
    c = self.config
    policy = policy or DecodePolicy()
    if policy.bounded:  # positions from the cache layout (models/kv_memory.py)
      from sparse_attention.models import kv_memory

      return kv_memory.decode(self, x, cache, length, policy)
    b, n, _ = x.shape
    s = cache.k.shape[1]
    q, k, v = self._qkv(x, positions)
    at = (0, length, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
    end = length + n
    lengths = jnp.broadcast_to(length, (b,))
    step = n <= DECODE_MAX_NEW  # else prefill: the full op over the cache
    k_gate, k_cmp, v_cmp = cache.k_gate, cache.k_cmp, cache.v_cmp
    if policy.kind == "topk_blocks":  # dense attention over each token's best blocks
      bs = policy.block_size
      mean = lambda blocks: self._phi(blocks, None)
      k_gate = self._update_blocks(k_gate, k_all, length, n, bs, bs, mean)
      k_c, v_c = k_all.astype(q.dtype), v_all.astype(q.dtype)
      if step:
        o = block_topk_decode_attention(
          q, k_c, v_c, k_gate.astype(q.dtype), lengths, block_size=bs, topk=policy.topk,
          implementation=c.implementation,
        )  # fmt: skip
      else:
        o = decode_attention(q, k_c, v_c, lengths, implementation=c.implementation)
    elif c.attention in ("dense", "sliding"):  # visits the filled tiles only
      o = decode_attention(
        q, k_all.astype(q.dtype), v_all.astype(q.dtype), lengths,
        window=c.window if c.attention == "sliding" else None, block_kv=c.block_size,
        implementation=c.implementation, **self._score_mod(),
      )  # fmt: skip
    elif c.attention == "moba":
      chunk = c.moba_chunk
      mean = lambda blocks: self._phi(blocks, None)
      k_gate = self._update_blocks(k_gate, k_all, length, n, chunk, chunk, mean)
      kw = dict(chunk_size=chunk, topk=c.moba_topk)
      if step:
        k_c, v_c = k_all.astype(q.dtype), v_all.astype(q.dtype)
        impl = "xla" if c.implementation == "xla_chunked" else c.implementation
        o = moba_decode_attention(
          q, k_c, v_c, k_gate.astype(q.dtype), lengths, implementation=impl, **kw
        )
      else:
        k_f, written = _right_aligned(k_all, end, s)
        v_f, _ = _right_aligned(v_all, end, s)
        segments = jnp.broadcast_to(written.astype(jnp.int32)[None], (b, s))
        o = moba_attention(
          q, k_f.astype(q.dtype), v_f.astype(q.dtype), segment_ids=segments,
          implementation=c.implementation, **kw,
        )  # fmt: skip
    else:
      geometry = (c.nsa_block_len, c.nsa_stride)
      k_cmp = self._update_blocks(k_cmp, k_all, length, n, *geometry, self._k_phi)
      v_cmp = self._update_blocks(v_cmp, v_all, length, n, *geometry, self._v_phi)
      gates = self._gates(x).astype(q.dtype)
      k_c, v_c = k_all.astype(q.dtype), v_all.astype(q.dtype)
      kc_c, vc_c = k_cmp.astype(q.dtype), v_cmp.astype(q.dtype)
      if step:
        o = nsa_decode_attention(
          q, k_c, v_c, kc_c, vc_c, gates, lengths, block_len=c.nsa_block_len,
          stride=c.nsa_stride, select_len=c.nsa_select_len, num_select=c.nsa_num_select,
          window=c.nsa_window, implementation=c.implementation,
        )  # fmt: skip
      else:
        q_all = jax.lax.dynamic_update_slice(jnp.zeros((b, s) + q.shape[2:], q.dtype), q, at)
        g_all = jnp.zeros((b, s) + gates.shape[2:], q.dtype)
        g_all = jax.lax.dynamic_update_slice(g_all, gates, at)
        o_all = self._nsa(q_all, k_c, v_c, kc_c, vc_c, g_all)
        o = jax.lax.dynamic_slice_in_dim(o_all, length, n, axis=1)
    y = self.wo(o.reshape(b, n, c.num_heads * c.head_dim))
    return y, LayerCache(k=k_all, v=v_all, k_gate=k_gate, k_cmp=k_cmp, v_cmp=v_cmp)

  def _k_phi(self, blocks: jax.Array) -> jax.Array:
    return self._phi(blocks, self.k_compress)

  def _v_phi(self, blocks: jax.Array) -> jax.Array:
    return self._phi(blocks, self.v_compress)

  @staticmethod
  def _update_blocks(old, x_all, length, n, block_len, stride, phi):
    """old [B, N, Hkv, D] with phi of the blocks [c * stride, c * stride + block_len) of
    x_all [B, S, Hkv, D] that `length -> length + n` completes written in (at most
    n // stride + 1 of them; phi: [B, M, block_len, Hkv, D] -> [B, M, Hkv, D])."""
    s = x_all.shape[1]
    done = lambda t: jnp.maximum((t - block_len) // stride + 1, 0)  # complete blocks, traced
    ids = done(length) + jnp.arange(n // stride + 1, dtype=jnp.int32)  # [M] >= the new ones
    rows = jnp.minimum(ids[:, None] * stride + jnp.arange(block_len), s - 1)  # [M, l]
    target = jnp.where(ids < done(length + n), ids, old.shape[1])  # past the end: dropped
    return old.at[:, target].set(phi(x_all[:, rows]).astype(old.dtype), mode="drop")


class MLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = config
    lin = functools.partial(
      nnx.Linear,
      use_bias=False,
      dtype=c.compute_dtype,
      param_dtype=c.params_dtype,
      kernel_init=_init(),
      rngs=rngs,
    )
    self.w1 = lin(c.dim, c.mlp_hidden)
    self.w3 = lin(c.dim, c.mlp_hidden)
    self.w2 = lin(c.mlp_hidden, c.dim, kernel_init=_init(1.0 / (2 * c.depth)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
  """x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    norm = functools.partial(RMSNorm, eps=config.norm_eps, param_dtype=config.params_dtype)
    self.norm1 = norm(config.dim)
    self.attn = Attention(config, rngs=rngs)
    self.norm2 = norm(config.dim)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, segment_ids, layout=None):
    x = x + self.attn(self.norm1(x), positions, segment_ids, layout)
    return x + self.mlp(self.norm2(x))

  def decode(self, x, positions, cache: LayerCache, length, policy: DecodePolicy):
    y, cache = self.attn.decode(self.norm1(x), positions, cache, length, policy)
    x = x + y
    return x + self.mlp(self.norm2(x)), cache


# ---------------------------------------------------------------------------- cache


DECODE_POLICIES = ("exact", "topk_blocks", "sinks", "hierarchical")


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
  """How cached decoding attends (a static part of the `Cache`).

  Attributes:
    kind: "exact" (the model's own attention: decoding equals the full forward) or
      "topk_blocks" (Kinetics-style block top-k, dense attention only, no retraining:
      each new token attends, per head, its own block of block_size keys, the first
      block and the topk - 2 blocks between with the largest q . mean(k_block);
      `ops.block_topk_decode_attention`; steps of more than DECODE_MAX_NEW tokens
      (prefill) stay exact). With topk >= the blocks of the cache it is exact.
      "sinks" (StreamingLLM) and "hierarchical" (a bounded KV memory; `models/kv_memory.py`,
      dense attention): the first `anchors` tokens, (hierarchical) `compressed_blocks`
      mean-pooled blocks of `block_size` tokens that left the window, merged pairwise
      when full, and the `window` most recent tokens, with RoPE positions taken in that
      layout: a fixed-size cache, decoding past config.max_len. Equal to "exact" while
      the length is <= anchors + window.
    block_size, topk: the blocks of "topk_blocks"; block_size is also the tokens pooled
      per compressed block of "hierarchical".
    anchors, window, compressed_blocks, pooled_bias: "sinks" / "hierarchical"
      (pooled_bias: a compressed slot's score + log(its tokens); off by default, it
      cost 0.01 nats in bench/results/long_generation_cpu_*.md).
  """

  kind: str = "exact"
  block_size: int = 64
  topk: int = 8
  anchors: int = 4
  window: int = 256
  compressed_blocks: int = 16
  pooled_bias: bool = False

  @property
  def bounded(self) -> bool:
    """A cache of fixed size whatever the length ("sinks", "hierarchical")."""
    return self.kind in ("sinks", "hierarchical")

  def check(self, config: LMConfig) -> None:
    """Raises ValueError naming the field if this policy does not fit the model."""
    if self.kind not in DECODE_POLICIES:
      raise ValueError(f"DecodePolicy.kind must be one of {DECODE_POLICIES}, got {self.kind!r}.")
    for name in ("block_size", "topk"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DecodePolicy.{name} must be an int >= 1, got {value!r}.")
    if self.kind == "topk_blocks" and (config.attention != "dense" or config.score_mod):
      raise ValueError(
        "DecodePolicy.kind='topk_blocks' needs attention='dense' without a score_mod, got "
        f"attention={config.attention!r}, score_mod={config.score_mod!r}."
      )
    if self.bounded:
      from sparse_attention.models import kv_memory

      kv_memory.check(self, config)


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["k", "v", "k_gate", "k_cmp", "v_cmp", "counts"],
  meta_fields=[],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One block's cache: k, v [B, S, Hkv, D] (position t at row t); MoBA also keeps its
  chunks' mean keys k_gate [B, ceil(S / moba_chunk), Hkv, D] and NSA the compressed
  k_cmp, v_cmp [B, Nc(S), Hkv, D] (a block's row valid once the block is complete).
  A bounded policy ("sinks", "hierarchical") keeps its own layout in k, v (unrotated)
  and the tokens of each compressed slot in counts (`models/kv_memory.py`)."""

  k: jax.Array
  v: jax.Array
  k_gate: jax.Array | None = None
  k_cmp: jax.Array | None = None
  v_cmp: jax.Array | None = None
  counts: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "length"],
                   meta_fields=["policy"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class Cache:
  """The decoding state: per-block `LayerCache`s, the tokens written (int32 []) and the
  `DecodePolicy` (static)."""

  layers: tuple[LayerCache, ...]
  length: jax.Array
  policy: DecodePolicy = DecodePolicy()

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]


# ---------------------------------------------------------------------------- model


_UNBOUNDED = 2**31 - 1  # token-count limit of a bounded cache policy


def _concrete_int(x: Any) -> int | None:
  try:
    return int(x)
  except TypeError:  # a tracer (jax's concretization errors are TypeErrors)
    return None


def _check_tokens(name: str, tokens: Any, max_len: int, vocab: int) -> None:
  """int [batch, length] token ids, 1 <= length <= max_len; ids in [0, vocab) when the
  array is concrete (under jit the data pipeline checks them)."""
  if not hasattr(tokens, "shape") or len(tokens.shape) != 2:
    raise ValueError(f"LM: {name} must be an int array [batch, length], got {tokens!r:.80}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"LM: {name} must be integer (int32), got {tokens.dtype}.")
  if not 1 <= tokens.shape[1] <= max_len:
    raise ValueError(
      f"LM: {name} has length {tokens.shape[1]}; it must be in [1, max_len={max_len}]."
    )
  check_values_in_range(tokens, f"LM: {name}", 0, vocab, note=f" (vocab_size={vocab})")


class LM(nnx.Module):
  """The decoder-only language model (see the module docstring).

  Example:
    model = LM(lm_tiny(attention="moba"), rngs=nnx.Rngs(0))
    logits = model(tokens)                                   # [B, L, 256] float32
    out = model.generate(prompt, 64, rng=jax.random.key(0))  # [B, P + 64]
    cache = model.init_cache(batch, 128)                     # or step by step
    logits, cache = model.decode(prompt, cache)              # prefill
    logits, cache = model.decode(next_tokens[:, None], cache)
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed = nnx.Embed(
      c.vocab_size,
      c.dim,
      dtype=c.compute_dtype,
      param_dtype=c.params_dtype,
      embedding_init=nnx.initializers.normal(1.0),
      rngs=rngs,
    )
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.depth)])
    self.norm = RMSNorm(c.dim, eps=c.norm_eps, param_dtype=c.params_dtype)
    self.head = nnx.Linear(
      c.dim,
      c.vocab_size,
      use_bias=False,
      dtype=c.compute_dtype,
      param_dtype=c.params_dtype,
      kernel_init=_init(),
      rngs=rngs,
    )

  def _logits(self, x: jax.Array) -> jax.Array:
    return self.head(self.norm(x)).astype(jnp.float32)

  def __call__(
    self,
    tokens: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    layout: cp.SequenceLayout | None = None,
  ) -> jax.Array:
    """tokens int [B, L] (and segment_ids int [B, L]) -> logits float32 [B, L, vocab].

    With `layout` (context parallelism, see the module docstring) the logits are in the
    layout's stored order (`layout.to_layout(targets)` matches them); no segment_ids.
    """
    c = self.config
    _check_tokens("tokens", tokens, c.max_len, c.vocab_size)
    b, l = tokens.shape
    if layout is not None:
      return self._context_parallel(tokens, segment_ids, layout)
    if segment_ids is not None:
      if getattr(segment_ids, "shape", None) != (b, l) or not jnp.issubdtype(
        segment_ids.dtype, jnp.integer
      ):
        raise ValueError(
          f"LM: segment_ids must be an int array of the tokens' shape {(b, l)}, got "
          f"{getattr(segment_ids, 'dtype', type(segment_ids))} "
          f"{getattr(segment_ids, 'shape', None)}."
        )
      check_values_in_range(segment_ids, "LM: segment_ids", 0, np.inf)
    positions = segment_positions(segment_ids, l)  # [B|1, L]
    x = self.embed(tokens)  # [B, L, dim]
    for block in self.blocks:
      x = block(x, positions, segment_ids)
    return self._logits(x)

  def _context_parallel(self, tokens, segment_ids, layout: cp.SequenceLayout) -> jax.Array:
    if segment_ids is not None:
      raise ValueError("LM: segment_ids are not supported with a context-parallel layout.")
    if layout.length != tokens.shape[1]:
      raise ValueError(f"LM: layout is for {layout.length} tokens, tokens have {tokens.shape[1]}.")
    problem = context_parallel_problem(self.config, layout.slice_len)
    if problem:
      raise ValueError(f"LM: {problem}")
    positions = jnp.asarray(layout.positions())[None]  # [1, L]: RoPE in stored order
    x = cp.shard_sequence(self.embed(layout.to_layout(tokens)))  # [B, L, dim], split
    for block in self.blocks:
      x = block(x, positions, None, layout)
    return self._logits(x)

  def init_cache(
    self,
    batch: int,
    max_len: int | None = None,
    dtype: Any = None,
    policy: DecodePolicy | None = None,
  ) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` (default config.max_len)
    tokens; dtype defaults to the compute dtype (else the parameters'); `policy` (default
    exact) says how decoding attends."""
    c = self.config
    policy = policy or DecodePolicy()
    policy.check(c)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
      raise ValueError(f"LM.init_cache: batch must be an int >= 1, got {batch!r}.")
    if dtype is None:
      dtype = c.compute_dtype or c.params_dtype
    if policy.bounded:  # a fixed size whatever max_len (models/kv_memory.py)
      from sparse_attention.models import kv_memory

      layer = LayerCache(**kv_memory.init_layer(batch, policy, c, dtype))
      return Cache(layers=(layer,) * c.depth, length=jnp.zeros((), jnp.int32), policy=policy)
    s = c.max_len if max_len is None else max_len
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= c.max_len:
      raise ValueError(f"LM.init_cache: max_len must be an int in [1, {c.max_len}], got {s!r}.")
    kv = jnp.zeros((batch, s, c.num_kv_heads, c.head_dim), dtype)
    nc = num_compressed_blocks(s, c.nsa_block_len, c.nsa_stride)
    cmp = jnp.zeros((batch, nc, c.num_kv_heads, c.head_dim), dtype)
    nsa_on = c.attention == "nsa"
    topk_on = policy.kind == "topk_blocks"
    block = policy.block_size if topk_on else c.moba_chunk  # MoBA's chunks or the blocks
    gate = jnp.zeros((batch, -(-s // block), c.num_kv_heads, c.head_dim), dtype)
    layer = LayerCache(
      k=kv,
      v=kv,
      k_gate=gate if c.attention == "moba" or topk_on else None,
      k_cmp=cmp if nsa_on else None,
      v_cmp=cmp if nsa_on else None,
    )
    return Cache(layers=(layer,) * c.depth, length=jnp.zeros((), jnp.int32), policy=policy)

  def decode(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Appends tokens int [B, n] to the cache; returns their logits [B, n, vocab] (float32).

    The logits equal the full forward's at positions cache.length .. + n - 1 (up to
    float32 round-off). Needs cache.length + n <= cache.max_len (checked when the
    length is concrete; under jit the caller keeps to it), except with a bounded policy
    ("sinks", "hierarchical": any length; the n tokens run one by one).
    """
    c = self.config
    bounded = cache.policy.bounded  # any length: the cache keeps a bounded memory
    _check_tokens("tokens", tokens, _UNBOUNDED if bounded else cache.max_len, c.vocab_size)
    n = tokens.shape[1]
    length = _concrete_int(cache.length)
    if length is not None and length < 0:
      raise ValueError(f"LM.decode: cache.length must be >= 0, got {length}.")
    if not bounded and length is not None and length + n > cache.max_len:
      raise ValueError(
        f"LM.decode: {n} tokens do not fit the cache ({length} of {cache.max_len} used)."
      )
    if len(cache.layers) != c.depth:
      raise ValueError(f"LM.decode: the cache has {len(cache.layers)} layers, not {c.depth}.")
    if tokens.shape[0] != cache.layers[0].k.shape[0]:
      raise ValueError(
        f"LM.decode: tokens has batch {tokens.shape[0]}, the cache "
        f"{cache.layers[0].k.shape[0]} (init_cache(batch))."
      )
    positions = (cache.length + jnp.arange(n, dtype=jnp.int32))[None]  # [1, n]
    x = self.embed(tokens)
    layers = []
    for block, layer in zip(self.blocks, cache.layers, strict=True):
      x, layer = block.decode(x, positions, layer, cache.length, cache.policy)
      layers.append(layer)
    return self._logits(x), Cache(tuple(layers), cache.length + n, cache.policy)

  def generate(
    self,
    prompt: jax.Array,
    steps: int,
    *,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    policy: DecodePolicy | None = None,
  ) -> jax.Array:
    """Samples `steps` tokens after `prompt` int [B, P]; returns int32 [B, P + steps].

    One jitted program: prefill (the whole prompt in one `decode`), then `steps - 1`
    single-token steps in a `lax.scan`, with a cache of P + steps positions.
    temperature 0 is greedy (argmax); top_k keeps the k most likely tokens. `policy`
    (default exact) says how the steps attend, e.g.
    `DecodePolicy("topk_blocks", block_size=64, topk=8)` for block top-k decoding, or
    `DecodePolicy("hierarchical", anchors=4, compressed_blocks=16, window=256)` for a
    bounded memory (then P + steps may exceed config.max_len).
    """
    c = self.config
    policy = policy or DecodePolicy()
    _check_tokens("prompt", prompt, _UNBOUNDED if policy.bounded else c.max_len, c.vocab_size)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
      raise ValueError(f"LM.generate: steps must be an int >= 0, got {steps!r}.")
    if not policy.bounded and prompt.shape[1] + steps > c.max_len:
      raise ValueError(
        f"LM.generate: prompt length {prompt.shape[1]} + steps {steps} exceeds max_len {c.max_len}."
      )
    if not isinstance(temperature, (int, float)) or temperature < 0:
      raise ValueError(f"LM.generate: temperature must be a number >= 0, got {temperature!r}.")
    if top_k is not None and (
      isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= c.vocab_size
    ):
      raise ValueError(f"LM.generate: top_k must be None or in [1, {c.vocab_size}], got {top_k!r}.")
    policy.check(c)
    prompt = jnp.asarray(prompt, jnp.int32)
    if steps == 0:
      return prompt
    graphdef, state = nnx.split(self)
    return _generate(graphdef, state, prompt, rng, int(steps), float(temperature), top_k, policy)


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None):
  """logits [B, V] -> int32 [B]."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(
  graphdef, state, prompt, rng, steps: int, temperature: float, top_k: int | None, policy
):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  cache = model.init_cache(b, p + steps, policy=policy)
  logits, cache = model.decode(prompt, cache)  # prefill
  rng, key = jax.random.split(rng)
  first = _sample(logits[:, -1], key, temperature, top_k)

  def step(carry, _):
    token, cache, rng = carry
    logits, cache = model.decode(token[:, None], cache)
    rng, key = jax.random.split(rng)
    token = _sample(logits[:, -1], key, temperature, top_k)
    return (token, cache, rng), token

  _, rest = jax.lax.scan(step, (first, cache, rng), None, length=steps - 1)  # [steps-1, B]
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def num_parameters(model: nnx.Module) -> int:
  """Total parameter count (works on `nnx.eval_shape` models: no compute)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
