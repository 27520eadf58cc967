"""The `implementation=` argument every attention op takes, resolved in one place.

None            the backend's first Pallas kernel that takes the call (Hopper GPUs:
                Mosaic GPU, then Triton; other GPUs: Triton; TPU: Mosaic TPU), else
                "xla" (always "xla" on CPU)
"pallas"        the same kernels, but never "xla"; off GPU/TPU only with interpret=True,
                which runs the Triton kernel in the Pallas interpreter
"pallas_mosaic_gpu", "pallas_triton", "pallas_tpu"
                that kernel on any backend (interpret=True off its hardware)
"reference", "xla", ...
                the op's own pure-JAX paths, returned as they are
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from sparse_attention.pallas_kernels.block_sparse.common import Unsupported

KERNELS = ("pallas_mosaic_gpu", "pallas_triton", "pallas_tpu")


def backend_kernels(backend: str) -> tuple[str, ...]:
  """The Pallas kernels of a backend, best first: Mosaic GPU on Hopper (sm90, whose
  wgmma it uses), Triton on every GPU, Mosaic TPU on TPUs; none elsewhere."""
  if backend == "tpu":
    return ("pallas_tpu",)
  if backend not in ("gpu", "cuda"):
    return ()
  capability = getattr(jax.devices()[0], "compute_capability", "")
  hopper = str(capability).split(".")[0] == "9"
  return ("pallas_mosaic_gpu", "pallas_triton") if hopper else ("pallas_triton",)


def resolve(
  implementation: Any,
  *,
  interpret: bool,
  op: str,
  implementations: Sequence[str],
  check: Callable[[str], None],
) -> str:
  """The concrete implementation to run: one of `implementations` other than "pallas".

  Args:
    implementation: the user's argument (None or a name).
    interpret: the user's `interpret` argument.
    op: the op's name, for error messages.
    implementations: the names the op accepts.
    check: `check(kernel)` raises `Unsupported`, saying why, when that kernel cannot
      take the call (shapes, dtypes, block sizes). Any other exception propagates.

  Raises:
    ValueError: `interpret` not a bool, an unknown name, "pallas" on a backend without
      a kernel and without interpret=True, or kernels asked for ("pallas" or a name) that
      cannot take the call.
  """
  if not isinstance(interpret, bool):
    raise ValueError(f"{op}: interpret must be a bool, got {interpret!r}.")
  if implementation is not None and (
    not isinstance(implementation, str) or implementation not in implementations
  ):
    raise ValueError(
      f"{op}: implementation must be None or one of {tuple(implementations)}, "
      f"got {implementation!r}."
    )
  backend = jax.default_backend()
  native = [k for k in backend_kernels(backend) if k in implementations]
  if implementation in (None, "pallas") and native:
    refusals = []
    for kernel in native:
      try:
        check(kernel)
      except Unsupported as e:
        refusals.append(f"{kernel}: {e}")
        continue
      return kernel
    if implementation is None:
      return "xla"  # a call no kernel takes: still correct, slower
    raise ValueError(f"{op}: implementation='pallas': " + "; ".join(refusals))
  if implementation is None:  # CPU: the xla path is the fast one
    return "xla"
  if implementation == "pallas":
    if not interpret:
      raise ValueError(
        f"{op}: implementation='pallas': no Pallas kernel compiles for the {backend!r} "
        "backend; pass interpret=True to run the GPU kernel in the Pallas interpreter, or "
        "use implementation='xla'."
      )
    implementation = "pallas_triton"
  if implementation in KERNELS:
    try:
      check(implementation)
    except Unsupported as e:
      raise ValueError(f"{op}: implementation={implementation!r}: {e}") from None
  return implementation
