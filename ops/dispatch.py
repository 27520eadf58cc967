"""The `implementation=` argument every attention op takes, resolved in one place.

None            the backend's Pallas kernel (GPU: Triton lowering, TPU: Mosaic) when
                it takes the call, else "xla" (always "xla" on CPU)
"pallas"        the backend's kernel; off GPU/TPU only with interpret=True, which
                runs the GPU kernel in the Pallas interpreter
"pallas_triton", "pallas_tpu"
                that kernel on any backend (interpret=True off its hardware)
"reference", "xla", ...
                the op's own pure-JAX paths, returned as they are
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

KERNELS = ("pallas_triton", "pallas_tpu")
BACKEND_KERNEL = {"gpu": "pallas_triton", "cuda": "pallas_triton", "tpu": "pallas_tpu"}


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
    check: `check(kernel)` raises ValueError, saying why, when that kernel cannot
      take the call (shapes, dtypes, block sizes).

  Raises:
    ValueError: `interpret` not a bool, an unknown name, "pallas" on a backend without
      a kernel and without interpret=True, or a kernel asked for by name that cannot
      take the call.
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
  native = BACKEND_KERNEL.get(backend)
  if implementation is None:
    if native is None:  # CPU: the xla path is the fast one
      return "xla"
    try:
      check(native)
    except ValueError:
      return "xla"  # a call the kernel does not take: still correct, slower
    return native
  if implementation == "pallas":
    if native is None and not interpret:
      raise ValueError(
        f"{op}: implementation='pallas': no Pallas kernel compiles for the {backend!r} "
        "backend; pass interpret=True to run the GPU kernel in the Pallas interpreter, or "
        "use implementation='xla'."
      )
    implementation = native or "pallas_triton"
  if implementation in KERNELS:
    try:
      check(implementation)
    except ValueError as e:
      raise ValueError(f"{op}: implementation={implementation!r}: {e}") from None
  return implementation
