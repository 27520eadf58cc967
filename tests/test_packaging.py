"""Packaging: one import namespace, nothing generic in site-packages, CI = README."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("wheel")
  # Built from a copy: setuptools writes build/ and *.egg-info into the source tree, and
  # two builds there at once (xdist workers) collide on them.
  source = tmp_path_factory.mktemp("source") / "sparse_attention"
  ignore = shutil.ignore_patterns(".*", "build", "*.egg-info", "workdirs", "__pycache__")
  shutil.copytree(ROOT, source, ignore=ignore)
  build = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(out),
      str(source),
    ],
    capture_output=True,
    text=True,
  )
  assert build.returncode == 0, build.stdout + build.stderr
  (path,) = out.glob("sparse_attention-*.whl")
  return path


def test_wheel_holds_only_the_sparse_attention_namespace(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names}
  assert {t for t in top if not t.endswith(".dist-info")} == {"sparse_attention"}, top
  for module in (
    "__init__.py",
    "ops/masks.py",
    "ops/block_mask.py",
    "ops/reference.py",
    "models/__init__.py",
    "pallas_kernels/__init__.py",
    "train/__init__.py",
    "configs/__init__.py",
    "configs/litv2_digits.py",
    "configs/lm_text.py",
    "configs/dit_digits.py",
  ):
    assert f"sparse_attention/{module}" in names, module
  assert not [n for n in names if "/tests/" in n or "/bench/" in n]


def test_installed_wheel_runs_a_config_by_name(wheel, tmp_path):
  """A non-editable install (the wheel unpacked into a folder first on sys.path, run from a
  folder that is not the checkout) finds `--config=litv2_digits` inside the package."""
  site = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
    check=True,
    capture_output=True,
  )
  env = dict(os.environ, PYTHONPATH=str(site))
  where = subprocess.run(
    [sys.executable, "-c", "import sparse_attention.configs as c; print(c.path('lm_text'))"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert where.stdout.strip() == str(site / "sparse_attention" / "configs" / "lm_text.py")
  cmd = ["-m", "sparse_attention.train.main", "--config=litv2_digits", "--workdir=run"]
  run = subprocess.run(
    [sys.executable, *cmd, "--config.steps=0"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  # The packaged config loaded (its field is checked), and nothing was written.
  assert (
    run.returncode == 2 and run.stderr == "error: config.steps must be a positive int, got 0.\n"
  )
  assert not (tmp_path / "run").exists()


def test_installed_package_imports_without_generic_top_level_names(tmp_path):
  code = (
    "import importlib.util, sparse_attention.ops as ops\n"
    "assert ops.masks.causal(8, 8, block_q=4, block_kv=4).max_kv_blocks == 2\n"
    "for name in ('ops', 'models', 'train', 'configs', 'pallas_kernels', 'tests'):\n"
    "  assert importlib.util.find_spec(name) is None, name\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def _readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```(?:sh|bash)\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
  main_cmd, test_cmd = _readme_commands()
  assert "pytest" in test_cmd and "pytest" not in main_cmd
  assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_lint_is_clean():
  for args in (["check", "."], ["format", "--check", "."]):
    result = subprocess.run(
      [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
