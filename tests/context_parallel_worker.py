"""Runs in its own process with N fake CPU devices (XLA_FLAGS set by the caller before jax
is imported); prints one JSON line of results for tests/test_context_parallel.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/context_parallel_worker.py MODE

Modes:
  ops      context-parallel attention vs the unsharded op (outputs, lse, gradients) on
           rings of 8 and 4 devices (a 4-device sub-mesh): the max abs error of every case
  memory   the per-device bytes (XLA memory analysis, compiled, not run) of a causal
           attention's forward + backward over 64k tokens on 1, 2, 4, 8 devices
  train    the LM trainer's per-step losses: `train RUN...`, RUN =
           attention:data:context:steps (e.g. dense:1:4:3)
"""

import functools
import json
import os
import pathlib
import sys
import tempfile

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=N")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from sparse_attention.ops import (  # noqa: E402
  TokenRoutes,
  block_sparse_attention,
  masks,
  moba_attention,
  nsa_attention,
)
from sparse_attention.ops import context_parallel as cp  # noqa: E402
from sparse_attention.ops import element_masks as em  # noqa: E402
from sparse_attention.ops.nsa import compress_mean  # noqa: E402

S, B, H, HKV, D, BLOCK = 128, 2, 4, 2, 8, 8
NSA = dict(block_len=16, stride=8, select_len=16, num_select=4, window=20)


def _mesh(data: int, context: int, devices=None):
  names, sizes = ("data", "context"), (data, context)
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _inputs():
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  q = jax.random.normal(keys[0], (B, S, H, D))
  k = jax.random.normal(keys[1], (B, S, HKV, D))
  v = jax.random.normal(keys[2], (B, S, HKV, D))
  gates = jax.nn.sigmoid(jax.random.normal(keys[3], (B, S, H, 3)))
  d_out = jax.random.normal(keys[4], (B, S, H, D))
  routes = TokenRoutes(
    jax.random.randint(keys[5], (B, 2, S, 2), -1, 3), jax.random.randint(keys[6], (B, S), 0, 3)
  )
  row_scale = jax.random.uniform(keys[7], (B, H, S)) + 0.5
  return q, k, v, gates, d_out, routes, row_scale


def _pullback(f, d_out, *args):
  """(outputs, gradients of sum(d_out * out) + sum(lse) w.r.t. args), one compiled
  program (under the active mesh for a context-parallel f)."""

  def both(d_out, *args):
    outs, vjp = jax.vjp(f, *args)
    cts = (d_out, jnp.ones_like(outs[1])) if isinstance(outs, tuple) else d_out
    return outs, vjp(cts)

  return jax.jit(both)(d_out, *args)


def _error(expected, got) -> float:
  pairs = zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True)
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)


# The cases each device count runs: on 8 devices a ring of 8 (dense_data2: batch over 2,
# a ring of 4); on a 4-device sub-mesh a ring of 4. Causal also runs on 4 devices with the
# interpreted Triton kernel as the engine; dense, MoBA and NSA rings of 4 also train the
# LM in test_context_parallel.py.
RINGS = {
  8: ("causal", "sliding", "dense_data2", "random_routes_row_scale", "moba", "nsa"),
  4: ("random_routes_row_scale", "moba", "causal_pallas_triton"),
}


def ops() -> dict[str, float]:
  """Max |context parallel - unsharded| per "case/devices", outputs, lse and gradients.
  The context axis takes the devices but in the "data2" case (batch over 2 x context)."""
  q, k, v, gates, d_out, routes, row_scale = _inputs()
  rng = np.random.default_rng(0)
  layout_mask = masks.from_layout(
    rng.random((1, H, S // BLOCK, S // BLOCK)) < 0.3,
    block_q=BLOCK, block_kv=BLOCK, q_len=S, kv_len=S,
  )  # fmt: skip
  geo = dict(block_q=BLOCK, block_kv=BLOCK)
  ref = dict(implementation="reference")  # the unsharded op's definition
  cases = {  # name: (unsharded fn(q, k, v), context-parallel fn(q, k, v, layout), data axis)
    "causal": (
      lambda *a: block_sparse_attention(*a, masks.causal(S, S, **geo), return_lse=True, **ref),
      lambda *a, layout: cp.block_sparse_attention(
        *a, em.Band(None, 0), layout=layout, return_lse=True, **geo
      ),
      1,
    ),
    "sliding": (
      lambda *a: block_sparse_attention(
        *a, masks.sliding_window(S, S, window=20, causal=True, **geo), return_lse=True, **ref
      ),
      lambda *a, layout: cp.block_sparse_attention(
        *a,
        masks.sliding_window(S, S, window=20, causal=True, **geo),
        layout=layout,
        return_lse=True,
      ),  # fmt: skip
      1,
    ),
    "dense_data2": (
      lambda *a: block_sparse_attention(*a, masks.dense(S, S, **geo), return_lse=True, **ref),
      lambda *a, layout: cp.block_sparse_attention(
        *a, masks.dense(S, S, **geo), layout=layout, return_lse=True
      ),
      2,
    ),
    "random_routes_row_scale": (
      lambda *a: block_sparse_attention(
        *a, layout_mask, routes=routes, row_scale=row_scale, return_lse=True, **ref
      ),
      lambda *a, layout: cp.block_sparse_attention(
        *a,
        layout_mask,
        layout=layout,
        return_lse=True,
        routes=TokenRoutes(layout.to_layout(routes.query, 2), layout.to_layout(routes.key)),
        row_scale=layout.to_layout(row_scale, 2),
      ),  # fmt: skip
      1,
    ),
    "moba": (
      lambda *a: moba_attention(*a, chunk_size=24, topk=3, return_lse=True, **ref),
      lambda *a, layout: cp.moba_attention(
        *a, chunk_size=24, topk=3, layout=layout, return_lse=True, **geo
      ),
      1,
    ),
  }
  cases["causal_pallas_triton"] = (  # the interpreted Triton kernel on every device
    cases["causal"][0],
    lambda *a, layout: cp.block_sparse_attention(
      *a,
      em.Band(None, 0),
      layout=layout,
      return_lse=True,
      implementation="pallas_triton",
      interpret=True,
      block_q=16,
      block_kv=16,  # Triton: tiles >= 16
    ),  # fmt: skip
    1,
  )
  errors, expected = {}, {}
  for n, names in RINGS.items():
    for name in names:
      if name == "nsa":
        errors[f"nsa/{n}"] = _nsa_error(q, k, v, gates, d_out, n)
        continue
      plain, parallel, data = cases[name]
      if name not in expected:  # the unsharded op once for every ring size
        expected[name] = _pullback(plain, d_out, q, k, v)
      layout = cp.SequenceLayout(S, n // data)
      with jax.set_mesh(_mesh(data, n // data, jax.devices()[:n])):
        f = functools.partial(parallel, layout=layout)
        args = (layout.to_layout(x) for x in (q, k, v))
        (out, lse), grads = _pullback(f, layout.to_layout(d_out), *args)
      got = (
        (layout.from_layout(out), layout.from_layout(lse, 2)),
        [layout.from_layout(g) for g in grads],
      )
      errors[f"{name}/{n}"] = _error(expected[name], got)
  return errors


def _nsa_error(q, k, v, gates, d_out, n) -> float:
  """NSA with mean-pooled compressed keys: unsharded vs context parallel (compressed
  keys cut on the shards by `cp.compress`), output and gradients (q, k, v, gates)."""
  cmp = dict(block_len=NSA["block_len"], stride=NSA["stride"])

  def plain(q, k, v, gates):
    kc, vc = compress_mean(k, **cmp), compress_mean(v, **cmp)
    return nsa_attention(q, k, v, kc, vc, gates, implementation="reference", **NSA)

  layout = cp.SequenceLayout(S, n)
  mean = lambda blocks: jnp.mean(blocks.astype(jnp.float32), axis=2).astype(blocks.dtype)

  def parallel(q, k, v, gates):
    kc, vc = (cp.compress(x, mean, layout=layout, **cmp) for x in (k, v))
    return cp.nsa_attention(
      q, k, v, kc, vc, gates, layout=layout, block_q=BLOCK, block_kv=BLOCK, **NSA
    )

  expected = _pullback(plain, d_out, q, k, v, gates)
  with jax.set_mesh(_mesh(1, n, jax.devices()[:n])):
    args = (layout.to_layout(x) for x in (q, k, v, gates))
    out, grads = _pullback(parallel, layout.to_layout(d_out), *args)
  return _error(expected, (layout.from_layout(out), [layout.from_layout(g) for g in grads]))


def memory(length: int = 65536, heads: int = 4, head_dim: int = 64) -> dict[str, int]:
  """Per-device bytes (arguments + outputs + temporaries) of the compiled forward +
  backward of causal context-parallel attention over `length` tokens, per device count
  (n = 1: the unsharded op). Long enough that the sequence-sized buffers outweigh the
  engine's fixed-size tile working set."""
  result = {}
  n = 1
  while n <= jax.device_count():
    mesh = _mesh(1, n, devices=jax.devices()[:n])
    layout = cp.SequenceLayout(length, n)
    spec = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

    def loss(q, k, v, layout=layout):
      out = cp.block_sparse_attention(
        q, k, v, em.Band(None, 0), layout=layout, block_q=64, block_kv=64
      )
      return jnp.sum(out * out)

    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    with jax.set_mesh(mesh):
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sharding,) * 3)
      stats = step.lower(spec, spec, spec).compile().memory_analysis()
    result[str(n)] = int(
      stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    )
    n *= 2
  return result


def train(runs: list[str]) -> dict[str, list[float]]:
  """Per-step train losses of short lm_text runs, RUN = attention:data:context:steps."""
  from absl import flags
  from ml_collections import config_flags

  from sparse_attention.train import trainer

  config_file = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "lm_text.py")
  result = {}
  for run in runs:
    attention, data, context, steps = run.split(":")
    argv = ["prog", f"--config={config_file}", *lm_overrides(steps, attention, data, context)]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    with tempfile.TemporaryDirectory() as workdir:
      trainer.train_and_evaluate(holder.value, workdir)
      result[run] = train_losses(workdir)
  return result


def lm_overrides(
  steps: int | str, attention: str, data: int | str, context: int | str
) -> list[str]:
  """The lm_text flags of the tests' short runs (also those of tests/test_multihost.py)."""
  return [
    f"--config.model.attention={attention}",
    f"--config.steps={steps}",
    "--config.batch_size=4",
    "--config.eval_batch_size=8",
    "--config.data.max_bytes=200000",
    "--config.log_every=1",
    "--config.eval_every=100000",
    "--config.checkpoint_every=100000",
    f"--config.mesh.data={data}",
    f"--config.mesh.context={context}",
  ]


def train_losses(workdir: str | pathlib.Path) -> list[float]:
  """The per-step train losses a run logged in its metrics.jsonl."""
  rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"]


if __name__ == "__main__":
  modes = {"ops": ops, "memory": memory, "train": lambda: train(sys.argv[2:])}
  result = modes[sys.argv[1]]()
  print("RESULT " + json.dumps(result), flush=True)
