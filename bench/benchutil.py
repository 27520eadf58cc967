"""Helpers shared by the benchmark scripts: timing, memory, machine facts.

Scripts in bench/ run as `python bench/<script>.py`, so this module is found
next to them.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention.ops import masks


def median_seconds(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` (compiled, results waited for)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_bytes(fn: Callable, *args) -> int:
  """XLA's own figure for a jitted call: arguments + outputs + temporaries."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def machine() -> str:
  """One line naming the machine the numbers come from."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    name = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
      pass
    return f"CPU: {name}, {os.cpu_count()} cores; jax {jax.__version__}"
  return f"{dev.device_kind} ({dev.platform}); jax {jax.__version__}"


def today() -> str:
  return datetime.date.today().isoformat()


def random_layout(seq: int, heads: int, block: int, density: float, seed: int = 0) -> jax.Array:
  """A random tile layout bool[1, heads, Sb, Sb] with about `density` kept."""
  sb = -(-seq // block)
  return jax.random.uniform(jax.random.PRNGKey(seed), (1, heads, sb, sb)) < density


def random_mask(seq: int, heads: int, block: int, density: float, seed: int = 0):
  """A BlockMask over a random layout; density 1.0 is the all-kept mask."""
  if density >= 1.0:
    return masks.dense(seq, seq, block_q=block, block_kv=block)
  layout = random_layout(seq, heads, block, density, seed)
  return masks.from_layout(layout, block_q=block, block_kv=block, q_len=seq, kv_len=seq)


def random_qkv(batch: int, seq: int, heads: int, head_dim: int, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(
    jax.random.normal(key, (batch, seq, heads, head_dim), jnp.float32).astype(dtype) for key in keys
  )


def format_table(header: list[str], rows: list[list[str]]) -> str:
  """A Markdown table."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
  line = lambda cells: (
    "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
  )
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def mib(nbytes: float) -> str:
  return f"{nbytes / 2**20:,.0f}"


class MSA(nnx.Module):
  """Plain multi-head self-attention: qkv Linear, `jax.nn.dot_product_attention`
  (its `implementation`: "xla", "cudnn"), proj Linear."""

  def __init__(self, dim: int, num_heads: int, *, implementation: str = "xla", rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    b, n, c = x.shape  # [B, H*W, C]
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    out = jax.nn.dot_product_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.implementation
    )
    return self.proj(out.reshape(b, n, c))


def jitted_forward(layer: nnx.Module, height: int, width: int):
  """A jax.jit'ed pure function (state, x) -> y of the layer, and its state."""
  graphdef, state = nnx.split(layer)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, height, width))
  return fn, state


START = time.perf_counter()  # when the benchmark process imported this module


def elapsed() -> float:
  """Seconds since the benchmark started (this module's import)."""
  return time.perf_counter() - START


def attempt(what: str, fn: Callable, *args):
  """fn(*args), or None after printing why it failed: one failing measurement (a peer
  missing, an out-of-memory) must not end a one-call GPU run. BENCH_TRACEBACK=1 in the
  environment prints the traceback too."""
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 - see the docstring
    print(f"  [{what}] failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
      traceback.print_exc()
    return None


def fwd_bwd(attend: Callable) -> Callable:
  """jit of d/d(q, k, v) sum(out) for `attend(q, k, v, *rest)` (out, or (out, ...)):
  what a training step's attention costs, forward + backward."""

  def loss(q, k, v, *rest):
    out = attend(q, k, v, *rest)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def write_result(name: str, text: str, out_dir: str = "") -> str:
  """Writes `text` to <out_dir>/<name>_<card>_<date>.md (out_dir default: bench/results;
  card: the first device's kind, e.g. NVIDIA_H200), prints and returns the path."""
  card = jax.devices()[0].device_kind.replace(" ", "_")
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}_{card}_{today()}.md")
  with open(path, "w") as f:
    f.write(text)
  print(f"written to {path}; {elapsed():.0f} s")
  return path
