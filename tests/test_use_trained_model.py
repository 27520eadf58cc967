"""README's "Use a trained model": its snippets run as written against short runs of the
three tasks, and `train.load` gives back what training left: the saved parameters, in
eval mode, with the run's config; the newest readable checkpoint; nothing written."""

import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
import testutil
from flax import nnx

from sparse_attention import train
from sparse_attention.train import checkpoint, data, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Short runs for the README's commands: same configs and workdirs, a few steps.
SHORT = {
  "litv2_digits": [
    "--config.steps=4",
    "--config.batch_size=32",
    "--config.checkpoint_every=2",
    "--config.eval_every=100",
  ],
  "lm_text": [
    "--config.steps=2",
    "--config.batch_size=4",
    "--config.eval_batch_size=8",
    "--config.data.seq_len=64",
    "--config.data.max_bytes=100000",
  ],
  "dit_digits": [
    "--config.steps=2",
    "--config.batch_size=32",
    "--config.model.hidden_size=32",
    "--config.model.depth=1",
    "--config.model.num_heads=2",
  ],
}


def _section() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("## Use a trained model")
  return text[start : text.index("\n## ", start + 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The README section's training commands, shortened, run in a fresh folder."""
  cwd = tmp_path_factory.mktemp("cwd")
  (commands,) = re.findall(r"```sh\n(.+?)\n```", _section(), flags=re.S)
  workdirs = {}
  for line in commands.splitlines():
    config = re.search(r"--config=(\w+)", line).group(1)
    workdir = re.search(r"--workdir=(\S+)", line).group(1)
    workdirs[config] = str(cwd / workdir)
    trainer.train_and_evaluate(testutil.load_config(config, *SHORT[config]), workdirs[config])
  assert set(workdirs) == set(SHORT)
  return cwd, workdirs


def test_readme_snippets_run_as_written(runs, monkeypatch, capsys):
  cwd, _ = runs
  monkeypatch.chdir(cwd)
  blocks = re.findall(r"```python\n(.+?)\n```", _section(), flags=re.S)
  assert len(blocks) == 3
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  out = capsys.readouterr().out
  assert "predicted [" in out and "sampled (10, 16, 16, 1)" in out
  assert namespace["tokens"].shape == (1, 15 + 48)
  assert np.isfinite(namespace["pixels"]).all()


def _stored_params(workdir: str, step: int):
  state, _ = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=9).read(step)
  return jax.tree.leaves(state["params"])


@pytest.mark.parametrize("name", sorted(SHORT))
def test_load_round_trip(runs, name):
  _, workdirs = runs
  workdir = workdirs[name]
  model, config = train.load(workdir)
  recorded = json.loads(pathlib.Path(workdir, "config.json").read_text())
  assert config.restored_step == recorded["steps"]
  assert config.model.to_dict() == recorded["model"] and config.task == recorded["task"]
  loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
  stored = _stored_params(workdir, config.restored_step)
  assert len(loaded) == len(stored)
  for a, b in zip(loaded, stored, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loaded_classifier_is_in_eval_mode_and_scores_as_trained(runs):
  _, workdirs = runs
  model, config = train.load(workdirs["litv2_digits"])
  datasets = data.make_datasets(config)
  test = data.load_split(datasets, "test")
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  logits = np.asarray(model(test["image"]))
  after = nnx.state(model, nnx.BatchStat)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))  # a call updates no statistics
  final = json.loads(pathlib.Path(workdirs["litv2_digits"], "final_metrics.json").read_text())
  accuracy = float(np.mean(np.argmax(logits, -1) == test["label"]))
  assert abs(accuracy - final["test"]["accuracy"]) < 1e-6


def test_load_falls_back_past_a_corrupt_checkpoint_and_writes_nothing(runs, tmp_path):
  _, workdirs = runs
  source = pathlib.Path(workdirs["litv2_digits"])
  workdir = tmp_path / "copy"
  shutil.copytree(source, workdir)
  for p in (workdir / "checkpoints" / "4").rglob("*"):
    if p.is_file() and "metadata" not in p.name:
      p.write_bytes(b"\x00garbage" * 16)
  listing = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  model, config = train.load(str(workdir))
  assert config.restored_step == 2
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == listing
  _, config = train.load(str(workdir), step=2)
  assert config.restored_step == 2
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    train.load(str(workdir), step=3)


def test_load_of_a_missing_workdir_creates_nothing(tmp_path):
  missing = tmp_path / "no" / "such" / "run"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    train.load(str(missing))
  assert not (tmp_path / "no").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    train.load(str(tmp_path / "empty"))
  assert not list((tmp_path / "empty").iterdir())
