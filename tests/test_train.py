"""The training system: configs, a short run's outputs, checkpoints that resume exactly
after SIGKILL, fallback past a corrupt checkpoint, and clear errors for bad configs."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import optax
import pytest
import testutil
from tensorboard.backend.event_processing import event_accumulator

from sparse_attention.train import checkpoint, data, tasks, trainer

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
    ("--config.label_smoothing=1.0", "config.label_smoothing"),
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


def _tensorboard_steps(workdir, tag: str) -> list[int]:
  """The steps TensorBoard shows for `tag` (its reader applies the runs' purge_step)."""
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  events.Reload()
  return [e.step for e in events.Scalars(tag)]


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
  assert _tensorboard_steps(tmp_path, "train/loss") == [1, 2, 3, 4]
  assert _tensorboard_steps(tmp_path, "test/accuracy") == [4]
  assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 4
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3).all_steps() == [2, 4]


def test_imagenet_config_trains_on_a_folder_of_mixed_images(tmp_path, caplog):
  """configs/litv2_imagenet.py (its augmentation, schedule and loss; LITv2-tiny in place
  of LITv2-S to keep the compile short) end to end on small generated folders of JPEG /
  PNG / WebP files (RGB, gray, RGBA, palette, 16-bit; odd sizes) with a stray text file,
  at 32x32, decoded in a worker process."""
  testutil.write_image_folder(tmp_path / "train", per_class=8)
  testutil.write_image_folder(tmp_path / "val", per_class=2, seed=1, stray=False)
  config = testutil.load_config(
    "litv2_imagenet",
    f"--config.data.path={tmp_path / 'train'}",
    f"--config.data.eval_path={tmp_path / 'val'}",
    "--config.model.name=litv2_tiny",
    "--config.data.image_size=32",
    "--config.data.worker_count=1",
    "--config.batch_size=4",
    "--config.eval_batch_size=4",
    "--config.steps=2",
    "--config.optimizer.warmup_steps=1",
  )
  with caplog.at_level("WARNING"):
    final = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert "skipped 1 files that are not images" in caplog.text  # notes.txt, counted
  facts = json.loads((tmp_path / "run" / "dataset.json").read_text())
  assert facts["class_names"] == ["cat", "dog"] and facts["image_shape"] == [32, 32, 3]
  assert facts["examples"] == {"train": 15, "eval": 4, "test": 1}
  assert np.isfinite(final["eval"]["loss"]) and np.isfinite(final["test"]["loss"])


def test_an_image_that_cannot_be_decoded_stops_the_run_naming_it(tmp_path):
  testutil.write_image_folder(tmp_path, per_class=4, stray=False)
  (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a JPEG")
  fields = {"kind": "images", "path": str(tmp_path), "eval_fraction": 0.0, "test_fraction": 0.0}
  # mean / std given: no statistics pass reads the files first
  datasets = data.make_datasets(dict(fields, mean=(0.5,) * 3, std=(0.25,) * 3))
  batches = data.train_batches(datasets, len(datasets.train), seed=0)
  with pytest.raises(trainer.UsageError, match="batch of step 1: cannot read .*broken.jpg"):
    trainer._next_batch(batches, "the training batch of step 1")  # the loop's way
  batches.close()


def test_label_smoothing_trains_on_smoothed_targets_and_reports_cross_entropy():
  logits = jax.numpy.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jax.numpy.asarray([0, 1])

  class Model:
    label_smoothing = 0.1

    def __call__(self, images):
      return logits

  batch = {"image": jax.numpy.zeros((2, 1)), "label": labels}
  loss, sums = tasks.TASKS["classification"].loss(Model(), batch, jax.numpy.float32)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  smooth = optax.softmax_cross_entropy(logits, 0.9 * jax.nn.one_hot(labels, 3) + 0.1 / 3)
  np.testing.assert_allclose(loss, smooth.mean(), rtol=1e-6)
  np.testing.assert_allclose(sums["loss_sum"], plain.sum(), rtol=1e-6)


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
  # The run goes on to step 6 from step 2: steps 3-4 are trained (and logged) again, their
  # first rows dropped. steps and checkpoint_every may change on resume.
  more = load_config(*FAST, "--config.steps=6", "--config.checkpoint_every=3")
  trainer.train_and_evaluate(more, str(tmp_path))
  steps = [
    json.loads(line)["step"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if json.loads(line)["split"] == "train"
  ]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert _tensorboard_steps(tmp_path, "train/loss") == steps  # the first 3-4 purged
  assert (tmp_path / "checkpoints" / "4.unreadable").is_dir()


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
  # The grain iterator's state, as grain's CheckpointHandler wrote it.
  iterator = pathlib.Path(ckpt.directory, str(step), "data", "process_0-of-1.json")
  return step, jax.tree.leaves(state), dict(meta, data=json.loads(iterator.read_text()))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 12-step run, to compare interrupted ones with."""
  reference = tmp_path_factory.mktemp("reference")
  proc = _run(reference)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return reference


def _train_steps(workdir) -> list[int]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
  return [r["step"] for r in rows if r["split"] == "train"]


def _assert_same_run(a, b):
  assert _losses(a) == _losses(b)  # exactly, every step
  assert _train_steps(a) == _train_steps(b) == list(range(1, 13))  # each step logged once
  step_a, leaves_a, meta_a = _final_state(a)
  step_b, leaves_b, meta_b = _final_state(b)
  assert step_a == step_b == 12 and len(leaves_a) == len(leaves_b) and meta_a == meta_b
  assert meta_a["data"] == {"next_index": 12 * 32}  # the iterator's position, 12 batches on
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_killed_job_resumes_bitwise(tmp_path, reference_run):
  killed = tmp_path / "killed"
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
  _assert_same_run(reference_run, killed)


def test_ctrl_c_saves_says_one_line_and_resumes_bitwise(tmp_path, reference_run):
  workdir = tmp_path / "interrupted"
  proc = _run(workdir)
  deadline = time.time() + 600
  while not (workdir / "metrics.jsonl").exists() or len(_train_steps(workdir)) < 4:
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 130, out
  last = out.strip().splitlines()[-1]
  match = re.fullmatch(
    r"stopped at step (\d+), checkpoint saved; run the same command to resume", last
  )
  assert match, out
  assert "Traceback" not in out and "rror" not in out, out
  stopped = int(match.group(1))
  assert 4 <= stopped < 12 and (workdir / "checkpoints" / str(stopped)).is_dir()
  proc = _run(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert f"Resumed from the checkpoint at step {stopped}" in out
  _assert_same_run(reference_run, workdir)


def test_stop_signals_are_deferred_then_restored():
  previous = signal.getsignal(signal.SIGTERM)
  previous_int = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background
  with trainer._StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread
    assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # a second signal is not deferred
  assert signal.getsignal(signal.SIGINT) is previous_int


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


# ---------------------------------------------------------------------------------------
# A workdir remembers its run; errors are one line; non-finite losses stop the run.


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_changed_config_is_refused_and_restart_moves_the_run_aside(tmp_path):
  trainer.train_and_evaluate(load_config(*FAST, "--config.steps=2"), str(tmp_path))
  saved = _files(tmp_path / "checkpoints")
  changed = load_config(
    *FAST, "--config.steps=2", "--config.model.alpha=0.5", "--config.optimizer.b2=0.9"
  )
  with pytest.raises(trainer.UsageError) as refused:
    trainer.train_and_evaluate(changed, str(tmp_path))
  message = str(refused.value)
  assert "model.alpha: 0.9 -> 0.5" in message and "optimizer.b2: 0.999 -> 0.9" in message
  assert "--restart" in message and "new --workdir" in message
  assert _files(tmp_path / "checkpoints") == saved  # untouched, nothing set aside
  other_data = load_config(*FAST, "--config.steps=2", "--config.data.image_size=16")
  with pytest.raises(trainer.UsageError, match="data.image_size: 8 -> 16"):
    trainer.train_and_evaluate(other_data, str(tmp_path))

  trainer.train_and_evaluate(changed, str(tmp_path), restart=True)
  (moved,) = (tmp_path / "previous").iterdir()
  assert _files(moved / "checkpoints") == saved
  assert json.loads((moved / "config.json").read_text())["model"]["alpha"] == 0.9
  assert json.loads((tmp_path / "config.json").read_text())["model"]["alpha"] == 0.5


def test_workdir_without_a_recorded_config_is_refused(tmp_path):
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # a run of an older version
  with pytest.raises(trainer.UsageError, match="recorded no config.json"):
    trainer.train_and_evaluate(load_config(*FAST, "--config.steps=2"), str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_incompatible_checkpoint_is_not_taken_for_a_corrupt_one(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, {"w": np.zeros((2, 3), np.float32)}, {"step": 1})
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"w: stored \(\(2, 3\)"):
    ckpt.restore_latest({"w": jax.numpy.zeros((3, 3))})
  assert ckpt.all_steps() == [1] and [p.name for p in tmp_path.iterdir()] == ["1"]
  step, state, meta = ckpt.restore_latest({"w": jax.numpy.ones((2, 3))})
  assert step == 1 and meta == {"step": 1} and not np.asarray(state["w"]).any()
  ckpt.close()


def test_steps_below_the_saved_step_is_refused(tmp_path):
  trainer.train_and_evaluate(load_config(*FAST, "--config.steps=2"), str(tmp_path))
  with pytest.raises(trainer.UsageError, match=r"config.steps \(1\) is below .* \(2\)"):
    trainer.train_and_evaluate(load_config(*FAST, "--config.steps=1"), str(tmp_path))
  # Equal: evaluates only, and rewrites its evaluation rows instead of repeating them.
  trainer.train_and_evaluate(load_config(*FAST, "--config.steps=2"), str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert [(r["step"], r["split"]) for r in rows] == [
    (1, "train"),
    (2, "train"),
    (2, "eval"),
    (2, "test"),
  ]


def test_empty_eval_and_test_splits_are_skipped(tmp_path, capsys):
  config = load_config(
    *FAST,
    "--config.steps=2",
    "--config.eval_every=1",
    "--config.data.eval_fraction=0.0",
    "--config.data.test_fraction=0.0",
  )
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final["eval"] is None and final["test"] is None
  err = capsys.readouterr().err
  assert "The eval split is empty" in err and "The test split is empty" in err
  assert json.loads((tmp_path / "final_metrics.json").read_text())["test"] is None


HUGE_LR = [
  "--config.optimizer.learning_rate=1e6",
  "--config.optimizer.grad_clip=0.0",
  "--config.optimizer.warmup_steps=0",
  "--config.steps=4",
  "--config.checkpoint_every=2",
  "--config.log_every=4",
]


def test_nonfinite_loss_stops_the_run_without_saving(tmp_path):
  with pytest.raises(trainer.Diverged, match=r"non-finite at step 2 .*nonfinite=skip"):
    trainer.train_and_evaluate(load_config(*FAST, *HUGE_LR), str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3).all_steps() == []
  assert not (tmp_path / "final_metrics.json").exists()


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
  config = load_config(*FAST, *HUGE_LR, "--config.nonfinite=skip")
  trainer.train_and_evaluate(config, str(tmp_path))
  (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()][:1]
  assert row["step"] == 4 and row["nonfinite_steps"] == 3  # steps 2-4 skipped
  assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])
  state, _ = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3).read(4)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_batches_are_checked_on_the_host():
  facts = types.SimpleNamespace(num_classes=10, vocab_size=256)
  ok = {"image": np.zeros((2, 4, 4, 1), np.float32), "label": np.array([0, 9])}
  trainer.check_batch(ok, facts, "batch")
  for batch, match in (
    (dict(ok, label=np.array([0, 10])), "batch: label 10 is outside \\[0, 10\\)"),
    (dict(ok, label=np.array([-1, 3])), "label -1 is outside"),
    ({"inputs": np.array([[1, 300]]), "targets": np.array([[1, 2]])}, "inputs 300"),
    (dict(ok, image=np.full((2, 4, 4, 1), np.nan, np.float32)), "image holds 32 non-finite"),
  ):
    with pytest.raises(trainer.UsageError, match=match):
      trainer.check_batch(batch, facts, "batch")


def test_eval_lines_are_never_glued_to_the_live_bar(tmp_path, capsys):
  log = trainer.MetricsLog(str(tmp_path), 10, "images", enabled=True, start=0)
  log.tty = True  # as on a terminal
  values = {"loss": 1.0, "learning_rate": 1e-3, "steps_per_s": 2.0, "examples_per_s": 64.0}
  log.progress(5, dict(values, eta_s=2.5))
  log.say("eval at step %d", 5)
  log.close()
  err = capsys.readouterr().err
  assert err.startswith("\r[############............] step 5/10")
  assert "ETA 0m02s\033[K\n[" in err and err.rstrip().endswith("eval at step 5")


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.stpes=3"], "unknown config field 'stpes' in --config.stpes=3. Did you mean"),
    (["--config.model.drop_path_rate=1.0"], "config.model.drop_path_rate must lie in [0, 1)"),
    (["--config.model.implementation=pallas"], "'pallas' needs a GPU or TPU"),
    (["--config=no_such_config"], "no such file, and not a packaged config"),
  ],
)
def test_cli_errors_are_one_line_with_status_2(tmp_path, args, message):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sparse_attention.train.main", "--config=litv2_digits"]
  result = subprocess.run(
    [*cmd, f"--workdir={workdir}", *args], capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 2, result.stderr
  assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
  assert message in result.stderr
  assert not workdir.exists()
