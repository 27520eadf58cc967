"""Suite-wide settings.

Fast compilation: the suite's programs are small and run once or twice, so XLA's CPU
backend compiles them at LLVM optimisation level 0 (`--xla_backend_optimization_level=0`
in XLA_FLAGS, inherited by subprocesses; about a third less time per compile-bound
test). Semantics are unchanged (no fast-math); benchmarks never run under it.

No persistent XLA compilation cache by default: on CPU, loading cached executables
back (`deserialize_executable`) crashed xdist workers with segmentation faults in two of
two full runs on jax 0.12.0.1 (a known class of bug: jax-ml/jax#28908), and a crashed
worker fails its test. SPARSE_ATTENTION_TEST_CACHE=1 turns one cache for the whole run
back on (shared by the xdist workers and the training jobs tests start as subprocesses;
entries are keyed by the HLO, the jax/XLA versions, the flags and the backend).
"""

import os
import pathlib
import tempfile

import jax

# No GPU / TPU device files: CPU only, for this process and the jobs tests start (they
# inherit the environment). Otherwise an installed libtpu (the TPU compile tests need it)
# probes for a TPU at every jax start and prints errors into the jobs' output.
_ACCELERATORS = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio")
if not any(os.path.exists(path) for path in _ACCELERATORS):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

if os.environ.get("SPARSE_ATTENTION_TEST_CACHE", "0") == "1":
  _dir = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(tempfile.gettempdir()) / f"sparse_attention_jax_cache_{os.getuid()}"),
  )
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", _dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
