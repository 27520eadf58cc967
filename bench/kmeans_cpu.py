r"""ops.kmeans on this CPU against scikit-learn's KMeans and a naive JAX k-means.

Three runs of the same Lloyd iterations from the same initial centroids (k random points
of x), float32, one problem (batch 1):

  ours      `ops.kmeans(x, init, iterations=T)`, the default implementation (on CPU:
            "xla", chunks of points x tiles of centroids, online argmin,
            segment-sum update), jitted.
  sklearn   `KMeans(n_clusters=k, init=init, n_init=1, max_iter=T, algorithm="lloyd",
            tol=0).fit(x)` on the same float32 array (scikit-learn then computes in
            float32), its OpenMP threads as threadpoolctl reports them.
  naive     `ops.kmeans(..., implementation="reference")`, jitted: the whole [n, k]
            distance matrix and a one-hot [n, k] update, what a direct JAX port does.

Timed interleaved (each repeat runs the three in turn, so that load from other
processes hits them alike), median of the repeats; the ratios are sklearn / ours and
naive / ours from the same run. Combinations whose naive run would hold more than
NAIVE_MAX_BYTES (the [n, k] distance and one-hot matrices) are skipped for naive and
marked so. A last column checks the results: ours' inertia relative to sklearn's.

  python bench/kmeans_cpu.py [--iterations=5] [--repeats=3]
"""

from __future__ import annotations

import importlib
import os
import statistics
import time

import benchutil
import jax
import jax.numpy as jnp
import numpy as np
import sklearn
import threadpoolctl
from absl import app, flags
from sklearn.cluster import KMeans

from sparse_attention import ops

_ITERATIONS = flags.DEFINE_integer("iterations", 5, "Lloyd iterations (sklearn's max_iter).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method (median).")
_NS = flags.DEFINE_list("n", ["16384", "65536", "262144"], "Numbers of points.")
_DS = flags.DEFINE_list("d", ["64", "128"], "Dimensions.")
_KS = flags.DEFINE_list("k", ["100", "1000"], "Numbers of clusters.")
_NAIVE_MAX_BYTES = flags.DEFINE_integer(
  "naive_max_bytes", 2**29, "Skip the naive run where its two [n, k] f32 matrices exceed this."
)


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _sklearn_threads() -> str:
  info = threadpoolctl.threadpool_info()
  return ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in info)


def main(argv):
  del argv
  iterations = _ITERATIONS.value
  kmeans_module = importlib.import_module("sparse_attention.ops.kmeans")
  ours = jax.jit(lambda x, init: ops.kmeans(x, init, iterations=iterations))
  naive = jax.jit(
    lambda x, init: ops.kmeans(x, init, iterations=iterations, implementation="reference")
  )
  load_before = os.getloadavg()
  header = ["n", "d", "k", "ours ms", "sklearn ms", "naive ms", "sklearn / ours",
            "naive / ours", "inertia vs sklearn"]  # fmt: skip
  rows = []
  rng = np.random.default_rng(0)
  for n in map(int, _NS.value):
    for d in map(int, _DS.value):
      for k in map(int, _KS.value):
        x = rng.normal(size=(1, n, d)).astype(np.float32)
        init = x[:, rng.choice(n, k, replace=False)]
        xj, initj = jnp.asarray(x), jnp.asarray(init)
        run_naive = 2 * n * k * 4 <= _NAIVE_MAX_BYTES.value
        fit = lambda x=x, init=init, k=k: KMeans(
          n_clusters=k, init=init[0], n_init=1, max_iter=iterations, algorithm="lloyd", tol=0
        ).fit(x[0])  # fmt: skip
        c, a = ours(xj, initj)  # compiles
        inertia = float(ops.kmeans_inertia(xj, c, a)[0])
        if run_naive:
          jax.block_until_ready(naive(xj, initj))
        times = {"ours": [], "sklearn": [], "naive": []}
        for _ in range(_REPEATS.value):
          times["ours"].append(_timed(ours, xj, initj))
          start = time.perf_counter()
          model = fit()
          times["sklearn"].append(time.perf_counter() - start)  # fit() returns when done
          if run_naive:
            times["naive"].append(_timed(naive, xj, initj))
        med = {key: statistics.median(v) if v else None for key, v in times.items()}
        rows.append([
          n, d, k, f"{med['ours'] * 1e3:,.0f}", f"{med['sklearn'] * 1e3:,.0f}",
          f"{med['naive'] * 1e3:,.0f}" if run_naive else "skipped",
          f"{med['sklearn'] / med['ours']:.2f}x",
          f"{med['naive'] / med['ours']:.2f}x" if run_naive else "-",
          f"{inertia / model.inertia_ - 1:+.1e}",
        ])  # fmt: skip
        print(" | ".join(map(str, rows[-1])), f"({benchutil.elapsed():.0f} s)", flush=True)
  load_after = os.getloadavg()
  table = benchutil.format_table(header, rows)
  skipped = [f"n={r[0]}, d={r[1]}, k={r[2]}" for r in rows if r[5] == "skipped"]
  text = f"""# k-means on CPU: ops.kmeans vs scikit-learn vs naive JAX

{benchutil.machine()}; scikit-learn {sklearn.__version__} (threads: {_sklearn_threads()}); \
{benchutil.today()}

Lloyd k-means, {iterations} iterations from the same init (k random points of x), float32,
one problem (batch 1), standard-normal points. ours: `ops.kmeans` default implementation
on CPU ("xla": chunks of {kmeans_module.XLA_BLOCK_N} points x tiles of at most \
{kmeans_module.XLA_BLOCK_K} centroids, online argmin, segment-sum update), jitted.
sklearn: `KMeans(n_clusters=k, init=init, n_init=1, max_iter={iterations}, \
algorithm="lloyd", tol=0).fit(x)` on the float32 array. naive: \
`ops.kmeans(implementation="reference")`, jitted (full [n, k] distance matrix, one-hot
update). Times: median of {_REPEATS.value} interleaved runs (compilation excluded);
ratios from the same run (> 1: ours is faster). Inertia vs sklearn: ours / sklearn - 1.
Load average (1, 5, 15 min) before: {", ".join(f"{v:.1f}" for v in load_before)}; after:
{", ".join(f"{v:.1f}" for v in load_after)} (the machine is shared: numbers are noisy).

{table}

Skipped naive runs (its [n, k] distance and one-hot matrices would exceed \
{_NAIVE_MAX_BYTES.value / 2**30:.1f} GiB,
and its time grows as n x k: minutes per combination with warmup and repeats):
{"; ".join(skipped) or "none"}.
"""
  benchutil.write_result("kmeans", text)


if __name__ == "__main__":
  app.run(main)
