"""`get_config()` files for `train/main.py` (big_vision style), shipped in the package so
`--config=<name>` works from a pip install as from a checkout.

litv2_digits    LITv2-tiny (HiLo) on the bundled digits: the README's main job
litv2_imagenet  LITv2-S at 224 on an ImageNet-style image folder, with LITv2's recipe
lm_text         a byte-level decoder-only LM (dense / sliding / MoBA / NSA attention) on
                the Python standard library's sources
dit_digits      a class-conditional DiT (flow matching) drawing digits; Re-ttention sampling
"""

from __future__ import annotations

import os
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_")))


def path(name: str) -> str:
  """The file of the packaged config `name` (e.g. "litv2_digits")."""
  if name not in NAMES:
    raise ValueError(f"no packaged config {name!r}; the packaged configs are {', '.join(NAMES)}.")
  return str(_HERE / f"{name}.py")


def resolve_argv(argv: list[str]) -> list[str]:
  """argv with every `--config=NAME` (or `--config NAME`, optionally `NAME:arg`) of a
  packaged config replaced by its file.

  Raises:
    ValueError: a value that is neither a packaged config nor an existing file.
  """
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value, prefix, at = arg[len("--config=") :], "--config=", i
    elif arg == "--config" and i + 1 < len(out):
      value, prefix, at = out[i + 1], "", i + 1
    else:
      continue
    name, sep, rest = value.partition(":")
    if name in NAMES:
      out[at] = f"{prefix}{path(name)}{sep}{rest}"
    elif not os.path.exists(name):
      raise ValueError(
        f"--config={value}: no such file, and not a packaged config ({', '.join(NAMES)})."
      )
  return out
