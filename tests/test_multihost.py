"""Multi-host training on loopback: two real processes of `python -m
sparse_attention.train.main` (`jax.distributed` with a coordinator on 127.0.0.1, two fake
CPU devices each, gloo CPU collectives) train configs/lm_text.py data parallel
(mesh.data=4) and context parallel (mesh.context=4: the attention ring crosses the
processes) and log the per-step losses of one process with four devices; the context
parallel run, killed (SIGKILL, both processes) after a checkpoint, resumes from it."""

import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import testutil
from context_parallel_worker import lm_overrides, train_losses

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "lm_text.py"
DATA_STEPS, CONTEXT_STEPS, CHECKPOINT_EVERY = 3, 12, 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: pathlib.Path, data: int, context: int, steps: int, *extra: str):
  """Starts the two processes of one run; returns [(Popen, log path)]."""
  port = _free_port()
  env = testutil.fake_devices_env(2, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  procs = []
  for pid in range(2):
    cmd = [
      sys.executable,
      "-m",
      "sparse_attention.train.main",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
      *lm_overrides(steps, "dense", data, context),
      *extra,
    ]
    log = workdir.parent / f"{workdir.name}.{pid}.log"
    with open(log, "a") as out:
      procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs) -> list[str]:
  """Waits for both processes; their logs (both must exit 0)."""
  logs = []
  for proc, log in procs:
    proc.wait(timeout=600)
    logs.append(log.read_text())
    assert proc.returncode == 0, logs[-1][-3000:]
  return logs


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
  reference = testutil.run_worker(
    "context_parallel_worker.py",
    "train",
    f"dense:4:1:{DATA_STEPS}",
    f"dense:1:4:{CONTEXT_STEPS}",
    devices=4,
  )

  data_parallel = tmp_path / "data"
  _wait(_launch(data_parallel, 4, 1, DATA_STEPS))
  np.testing.assert_allclose(
    train_losses(data_parallel), reference[f"dense:4:1:{DATA_STEPS}"], rtol=1e-5
  )

  context_parallel = tmp_path / "context"
  procs = _launch(
    context_parallel, 1, 4, CONTEXT_STEPS, f"--config.checkpoint_every={CHECKPOINT_EVERY}"
  )
  first = context_parallel / "checkpoints" / str(CHECKPOINT_EVERY)
  deadline = time.time() + 600
  while not first.exists():  # orbax renames a checkpoint into place once it is complete
    for proc, log in procs:
      assert proc.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  for proc, _ in procs:
    proc.send_signal(signal.SIGKILL)
  for proc, _ in procs:
    proc.wait()
  assert not (context_parallel / "final_metrics.json").exists()  # killed before the end

  logs = _wait(_launch(context_parallel, 1, 4, CONTEXT_STEPS))
  assert "Resumed from the checkpoint at step" in logs[0], logs[0][-3000:]
  losses = train_losses(context_parallel)  # each step once: the resumed run rewrote its tail
  assert len(losses) == CONTEXT_STEPS, losses
  np.testing.assert_allclose(losses, reference[f"dense:1:4:{CONTEXT_STEPS}"], rtol=1e-5)
