r"""Trains a model from a config: the library's training entry point.

  python -m sparse_attention.train.main --config=litv2_digits --workdir=/tmp/run \
      [--config.steps=200 --config.model.name=litv2_s ...]

`--config` takes the name of a config shipped in `sparse_attention/configs/`
(litv2_digits, litv2_imagenet, lm_text, dit_digits) or the path of any file with
`get_config()`.

A job stopped by Ctrl-C or SIGTERM saves a checkpoint and says so; a job killed at any
moment resumes, started again with the same --workdir, from its newest complete
checkpoint. A workdir remembers its run's config: a later run with a config that cannot
continue it is refused (use a new --workdir, or --restart to move the old run aside).

Exit status: 0 done; 1 stopped on a non-finite loss; 2 a bad flag, config field, data or
workdir (one line on stderr; --debug shows the traceback); 130 / 143 stopped by SIGINT /
SIGTERM after saving a checkpoint.

Multi-host (one process per host): pass --coordinator_address, --num_processes and
--process_id, or set the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment variables (or --distributed where `jax.distributed.initialize()` detects the
cluster by itself, e.g. Cloud TPU, SLURM).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_attention import configs
from sparse_attention.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config name (" + ", ".join(configs.NAMES) + ") or a file with get_config(); "
  "--config.a.b=v overrides fields.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_RESTART = flags.DEFINE_bool(
  "restart",
  False,
  "Start over in a --workdir that holds a run: its files move to <workdir>/previous/<time>/ "
  "(nothing is deleted).",
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks instead of one-line errors.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for multi-host runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with auto-detected settings."
)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_USAGE = 2
EXIT_DIVERGED = 1


def _fail(message: str, status: int = EXIT_USAGE) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  """An exception's message on one line, unescaped (ml_collections wraps a misspelt
  field's KeyError repr, with its suggestion, in an AttributeError)."""
  text = str(e.args[0]) if e.args else str(e)
  if isinstance(e, AttributeError | KeyError) and text[:1] in "'\"":
    text = text.strip("'\"").replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return " ".join(lines) or type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --config=NAME resolved to the packaged file and errors
  (an unknown flag or config field, a config file that fails to load) as one line."""
  debug = "--debug" in argv
  try:
    resolved = configs.resolve_argv(argv)
    rest = flags.FLAGS(resolved)
    _CONFIG.value.keys()  # config_flags defers a file's load errors to first use
    return rest
  except Exception as e:  # noqa: BLE001 - every parse error becomes one line
    if debug:
      raise
    _fail(_parse_error(e, argv))
  raise AssertionError("unreachable")


def _parse_error(e: BaseException, argv: list[str]) -> str:
  if isinstance(e, flags.Error):
    return f"{_one_line(e)} (see --helpfull)"
  if str(e).startswith("--config"):  # configs.resolve_argv names the flag itself
    return _one_line(e)
  if isinstance(e, AttributeError | KeyError):  # a misspelt field in an override
    field = _one_line(e).split()[0].strip("'\"")
    culprit = [a for a in argv if a.startswith("--config.") and field in a]
    where = f" in {culprit[0]}" if culprit else ""
    hint = _one_line(e)[len(field) + 2 :].strip()
    return f"unknown config field {field!r}{where}. {hint}".strip()
  config = " ".join(a for a in argv[1:] if a.startswith("--config") and "." not in a[:9])
  return f"{config or '--config'}: {type(e).__name__}: {_one_line(e)}"


def _initialize_distributed() -> None:
  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator or _DISTRIBUTED.value:
    num = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    logging.info("Process %d of %d.", jax.process_index(), jax.process_count())


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; --verbosity=0 shows it
  _initialize_distributed()
  try:
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)
  except trainer.UsageError as e:
    if _DEBUG.value:
      raise
    _fail(str(e))
  except trainer.Diverged as e:
    if _DEBUG.value:
      raise
    _fail(str(e), EXIT_DIVERGED)
  except trainer.Interrupted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # before the first step: nothing to save
    print("interrupted before training started; nothing was saved", file=sys.stderr)
    sys.exit(130)
  if jax.process_index() == 0:
    for split in ("eval", "test"):
      values = final[split]
      text = "skipped (empty split)" if values is None else trainer.format_metrics(values)
      print(f"{split}: {text}", flush=True)


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
