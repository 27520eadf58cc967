"""The training system: configs, a short run's outputs, checkpoints that resume exactly
after SIGKILL, fallback past a corrupt checkpoint, and clear errors for bad configs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import testutil

from sparse_attention.train import checkpoint, summary, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "litv2_digits.py")
# Small and fast: 8x8 digits, a few steps; drop path on so the RNG streams matter.
FAST = [
  "--config.data.image_size=8",
  "--config.batch_size=32",
  "--config.eval_batch_size=64",
  "--config.model.drop_path_rate=0.1",
  "--config.optimizer.warmup_steps=2",
  "--config.log_every=1",
]


def load_config(*overrides: str):
  return testutil.load_config("litv2_digits", *overrides)


def test_config_file_and_overrides():
  config = load_config("--config.steps=7", "--config.model.alpha=0.5", "--config.mesh.fsdp=1")
  assert config.steps == 7 and config.model.alpha == 0.5
  assert config.task == "classification" and config.data.kind == "digits"
  trainer.check_config(config)
  with pytest.raises(AttributeError, match="steps"):  # a typo in a field name
    load_config("--config.stpes=7")


@pytest.mark.parametrize(
  "override, match",
  [
    ("--config.steps=0", "config.steps"),
    ("--config.compute_dtype=float8", "config.compute_dtype"),
    ("--config.model.name=vit", "config.model.name"),
    ("--config.model.attention=moba", "config.model.attention"),
    ("--config.optimizer.learning_rate=-1.0", "config.optimizer.learning_rate"),
    ("--config.optimizer.accumulate_steps=7", "config.optimizer.accumulate_steps"),
    ("--config.task=segmentation", "config.task"),
  ],
)
def test_invalid_config_names_the_field(override, match):
  with pytest.raises(ValueError, match=match):
    trainer.check_config(load_config(override))


@pytest.mark.parametrize(
  "overrides, match",
  [
    (["--config.mesh.fsdp=3"], "config.mesh"),
    (["--config.data.kind=images", "--config.data.path=/no/such/folder"], "/no/such/folder"),
    (["--config.data.kind=npz", "--config.data.path=/no/such.npz"], "/no/such.npz"),
    (["--config.data.kind=text"], "text data"),
  ],
)
def test_bad_setup_fails_before_training(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(load_config(*FAST, *overrides), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_short_run_writes_metrics_checkpoints_and_summary(tmp_path):
  config = load_config(
    *FAST, "--config.steps=4", "--config.checkpoint_every=2", "--config.eval_every=2"
  )
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert set(final) == {"step", "eval", "test", "parameters"}
  assert 0 <= final["test"]["accuracy"] <= 1
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for key in ("loss", "accuracy", "learning_rate", "steps_per_s", "examples_per_s", "eta_s"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert {r["split"] for r in records} == {"train", "eval", "test"}
  scalars = summary.read_scalars(str(tmp_path))
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 4
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3).all_steps() == [2, 4]


def _corrupt(step_dir: pathlib.Path) -> None:
  """Overwrite every data file of a checkpoint with garbage (metadata kept)."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and "metadata" not in p.name]
  assert files
  for p in files:
    p.write_bytes(b"\x00garbage" * 16)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  first = load_config(*FAST, "--config.steps=4", "--config.checkpoint_every=2")
  trainer.train_and_evaluate(first, str(tmp_path))
  _corrupt(tmp_path / "checkpoints" / "4")
  # The run goes on to step 6 from step 2: steps 3-4 are trained (and logged) again.
  more = load_config(*FAST, "--config.steps=6", "--config.checkpoint_every=2")
  trainer.train_and_evaluate(more, str(tmp_path))
  steps = [
    json.loads(line)["step"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if json.loads(line)["split"] == "train"
  ]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]


def _run(workdir, *extra):
  cmd = [
    sys.executable,
    "-m",
    "sparse_attention.train.main",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    *FAST,
    "--config.steps=12",
    "--config.checkpoint_every=3",
    "--config.eval_every=100",
    *extra,
  ]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir) -> dict[int, float]:
  """The last logged train loss of every step (a resumed run logs some steps twice)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["split"] == "train":
      out[record["step"]] = record["loss"]
  return out


def _final_state(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  step = ckpt.all_steps()[-1]
  state, meta = ckpt.read(step)  # as stored: compare bit for bit
  return step, jax.tree.leaves(state), meta


def test_killed_job_resumes_bitwise(tmp_path):
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  proc = _run(reference)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out

  proc = _run(killed)
  deadline = time.time() + 600
  while not (killed / "checkpoints" / "6").exists():  # the second checkpoint is complete
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "final_metrics.json").exists()
  proc = _run(killed)  # resume
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "Resumed from the checkpoint at step" in out

  assert _losses(killed) == _losses(reference)  # exactly, every step
  step_a, leaves_a, meta_a = _final_state(reference)
  step_b, leaves_b, meta_b = _final_state(killed)
  assert step_a == step_b == 12 and len(leaves_a) == len(leaves_b) and meta_a == meta_b
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_precision_accumulation_and_profile(tmp_path):
  """bf16 compute with float32 parameters, 2-step gradient accumulation, a profile."""
  config = load_config(
    *FAST,
    "--config.steps=6",
    "--config.compute_dtype=bfloat16",
    "--config.optimizer.accumulate_steps=2",
    "--config.profile.start_step=2",
    "--config.profile.num_steps=2",
    "--config.checkpoint_every=6",
  )
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, 7)) and all(np.isfinite(list(losses.values())))
  state, _ = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3).read(6)
  params = jax.tree.leaves(state["params"])
  assert params and all(p.dtype == np.float32 for p in params)  # master weights stay f32
  assert any((tmp_path / "profile").rglob("*.xplane.pb"))


def test_distributed_initialization_single_process(tmp_path):
  """The multi-host path (jax.distributed.initialize) with one process on loopback."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = _run(
    tmp_path,
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=1",
    "--process_id=0",
    "--config.steps=2",
  )
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "test: loss" in out
