"""Element-level mask predicates used inside the partial blocks of a BlockMask.

A `BlockMask` says which (q block, kv block) tiles attention visits; for the
tiles it marks *partial* it also needs to know which individual (query, key)
pairs are visible. That is what an element mask answers: a small, hashable,
static predicate

    fn(q_idx, kv_idx) -> bool      # int32 position arrays, broadcast together

written with plain `jnp`/`np` comparisons so it evaluates the same way in the
reference op, in the XLA path and inside a Pallas kernel body.

Each predicate also classifies whole tiles analytically through `classify`:
given the inclusive position ranges of a tile it says whether *any* pair in the
tile is visible and whether *all* of them are. Mask builders use that to lay
out blocks in O(Qb * Kb) work without ever materialising the O(S^2) mask.
`classify` may be conservative in one direction only: `any` may say True for a
tile that is empty (the tile is then visited and masked out), `all` must never
say True for a tile that has a hidden pair.

Positions are absolute: query i is row i of q, key j is row j of k/v.

A `MaskMod` (what `masks.create_block_mask` builds) is the one predicate that also
reads the batch row, the query head and array parameters:
`mask_mod(b, h, q_idx, kv_idx[, params]) -> bool`, FlexAttention's contract. It has no
analytic `classify` (its tiles are classified by evaluating it) and says so with
`per_batch_head = True`; every consumer evaluates any element mask through
`element_visible(fn, b, h, q_idx, kv_idx, params)` (pallas_kernels/block_sparse/
common.py), which passes b, h and the mask's parameters where the predicate takes them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

from sparse_attention.pallas_kernels.block_sparse.common import element_visible

Array = Any  # np.ndarray or jax.Array; the predicates use operators only.


class ElementMask(Protocol):
  """What BlockMask needs of an element predicate (hashable, static)."""

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array: ...

  def classify(
    self, q_lo: Array, q_hi: Array, kv_lo: Array, kv_hi: Array
  ) -> tuple[Array, Array]: ...


@dataclasses.dataclass(frozen=True)
class MaskMod:
  """A user predicate `fn(b, h, q_idx, kv_idx[, params]) -> bool` (hashable by `fn`).

  Its parameters live in the BlockMask (`mask.mask_params[slot]`, traced data, so new
  values never retrace); `slot` says which entry of that tuple is this predicate's.
  """

  fn: Any
  has_params: bool
  slot: int = 0

  per_batch_head = True

  def evaluate(self, b: Array, h: Array, q_idx: Array, kv_idx: Array, params: tuple) -> Array:
    if self.has_params:
      return self.fn(b, h, q_idx, kv_idx, params[self.slot])
    return self.fn(b, h, q_idx, kv_idx)

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    raise TypeError(
      "A mask_mod needs the batch row, the head and its parameters: evaluate it with "
      "common.element_visible(mask_fn, q_idx, kv_idx, b, h, params)."
    )


def shift_slots(fn: Any, offset: int) -> Any:
  """`fn` with the parameter slots of its MaskMods moved by `offset` (when masks with
  parameters are combined, their parameter tuples are concatenated)."""
  if isinstance(fn, MaskMod):
    return dataclasses.replace(fn, slot=fn.slot + offset)
  if isinstance(fn, (AllOf, AnyOf)):
    return type(fn)(tuple(shift_slots(m, offset) for m in fn.members))
  return fn


def _and(a: Array, b: Array) -> Array:
  return a & b


def _or(a: Array, b: Array) -> Array:
  return a | b


@dataclasses.dataclass(frozen=True)
class Band:
  """Key j is visible to query i iff `lower <= j - i <= upper`.

  `None` leaves that side unbounded. This one predicate covers:
    causal (top-left aligned):         Band(None, 0)
    causal aligned bottom-right:       Band(None, kv_len - q_len)
    sliding window (left, right):      Band(-left, right)   (as `local_window_size`
                                       of `jax.nn.dot_product_attention`)
  """

  lower: int | None = None
  upper: int | None = None

  def __post_init__(self):
    if self.lower is not None and self.upper is not None and self.lower > self.upper:
      raise ValueError(f"Band: lower={self.lower} must be <= upper={self.upper}.")

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    d = kv_idx - q_idx
    out = None
    if self.lower is not None:
      out = d >= self.lower
    if self.upper is not None:
      up = d <= self.upper
      out = up if out is None else out & up
    if out is None:  # unbounded both ways: everything visible
      out = d == d
    return out

  def classify(self, q_lo, q_hi, kv_lo, kv_hi):
    # j - i over the tile covers every integer in [d_min, d_max].
    d_min = kv_lo - q_hi
    d_max = kv_hi - q_lo
    any_ = d_max == d_max
    all_ = any_
    if self.lower is not None:
      any_ = any_ & (d_max >= self.lower)
      all_ = all_ & (d_min >= self.lower)
    if self.upper is not None:
      any_ = any_ & (d_min <= self.upper)
      all_ = all_ & (d_max <= self.upper)
    return any_, all_


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Key j is visible to query i iff both lie in the same chunk of `size`."""

  size: int

  def __post_init__(self):
    if self.size <= 0:
      raise ValueError(f"Chunk: size must be positive, got {self.size}.")

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    return (q_idx // self.size) == (kv_idx // self.size)

  def classify(self, q_lo, q_hi, kv_lo, kv_hi):
    c = self.size
    qa, qb, ka, kb = q_lo // c, q_hi // c, kv_lo // c, kv_hi // c
    any_ = (qa <= kb) & (ka <= qb)  # the chunk ranges intersect
    all_ = (qa == qb) & (ka == kb) & (qa == ka)
    return any_, all_


@dataclasses.dataclass(frozen=True)
class Strided:
  """Key j is visible to query i iff j * stride + lag <= i: a causal mask over keys that
  stand for strided blocks (NSA's compressed keys: block j ends at j * stride + lag in
  the query's coordinates). Monotone (up in i, down in j), so a tile's corners classify
  it exactly."""

  stride: int
  lag: int

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    return kv_idx * self.stride + self.lag <= q_idx

  def classify(self, q_lo, q_hi, kv_lo, kv_hi):
    return kv_lo * self.stride + self.lag <= q_hi, kv_hi * self.stride + self.lag <= q_lo


@dataclasses.dataclass(frozen=True)
class AllOf:
  """Visible iff every member predicate says visible (mask intersection)."""

  members: tuple[Any, ...]

  @property
  def per_batch_head(self) -> bool:
    return any(getattr(m, "per_batch_head", False) for m in self.members)

  def evaluate(self, b, h, q_idx, kv_idx, params):
    return functools.reduce(
      _and, (element_visible(m, b, h, q_idx, kv_idx, params) for m in self.members)
    )

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    return functools.reduce(_and, (m(q_idx, kv_idx) for m in self.members))

  def classify(self, q_lo, q_hi, kv_lo, kv_hi):
    parts = [m.classify(q_lo, q_hi, kv_lo, kv_hi) for m in self.members]
    # `any` is conservative here: each member may see pairs, but not the same.
    return (
      functools.reduce(_and, (p[0] for p in parts)),
      functools.reduce(_and, (p[1] for p in parts)),
    )


@dataclasses.dataclass(frozen=True)
class AnyOf:
  """Visible iff some member predicate says visible (mask union)."""

  members: tuple[Any, ...]

  @property
  def per_batch_head(self) -> bool:
    return any(getattr(m, "per_batch_head", False) for m in self.members)

  def evaluate(self, b, h, q_idx, kv_idx, params):
    return functools.reduce(
      _or, (element_visible(m, b, h, q_idx, kv_idx, params) for m in self.members)
    )

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    return functools.reduce(_or, (m(q_idx, kv_idx) for m in self.members))

  def classify(self, q_lo, q_hi, kv_lo, kv_hi):
    parts = [m.classify(q_lo, q_hi, kv_lo, kv_hi) for m in self.members]
    # `all` is conservative here: members may cover a tile only together.
    return (
      functools.reduce(_or, (p[0] for p in parts)),
      functools.reduce(_or, (p[1] for p in parts)),
    )


def _flatten(kind: type, fns) -> list[Any]:
  out = []
  for f in fns:
    out.extend(f.members if isinstance(f, kind) else [f])
  return out


def all_of(*fns) -> Any:
  """The intersection of predicates, simplified (bands merge into one band)."""
  members = _flatten(AllOf, fns)
  bands = [m for m in members if isinstance(m, Band)]
  rest = [m for m in members if not isinstance(m, Band)]
  if len(bands) > 1:
    lowers = [b.lower for b in bands if b.lower is not None]
    uppers = [b.upper for b in bands if b.upper is not None]
    lower = max(lowers) if lowers else None
    upper = min(uppers) if uppers else None
    if lower is not None and upper is not None and lower > upper:
      # Empty band: keep it as an unsatisfiable AllOf rather than fail.
      rest = bands + rest
    else:
      rest = [Band(lower, upper)] + rest
  else:
    rest = bands + rest
  rest = list(dict.fromkeys(rest))  # drop exact duplicates, keep order
  return rest[0] if len(rest) == 1 else AllOf(tuple(rest))


def any_of(*fns) -> Any:
  """The union of predicates (duplicates dropped)."""
  members = list(dict.fromkeys(_flatten(AnyOf, fns)))
  return members[0] if len(members) == 1 else AnyOf(tuple(members))
