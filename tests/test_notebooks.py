"""The notebooks run top to bottom without error (in their FAST mode), and are stored with the
outputs of a full run (plots visible where the repository is browsed)."""

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
  """A `python3` kernel that runs this interpreter (whatever kernelspecs the machine has),
  in FAST mode, with matplotlib's non-interactive backend."""
  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3 (sparse_attention tests)",
    "language": "python",
    "env": {"SPARSE_ATTENTION_NOTEBOOK_FAST": "1", "MPLBACKEND": "Agg"},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _execute(name: str, tmp_path: pathlib.Path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  client = nbclient.NotebookClient(
    nb,
    km=_kernel_manager(tmp_path),
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
  )
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  return nb


def _text(nb) -> str:
  """Everything the notebook printed (streams and plain-text results)."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        parts.append(out.get("data", {}).get("text/plain", ""))
  return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "kernels.ipynb", "programmable.ipynb"])
def test_stored_notebook_holds_the_outputs_of_a_full_run(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), name
  outputs = [out for cell in code for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"], name
  assert any("image/png" in out.get("data", {}) for out in outputs), name  # the plots
  assert "FAST=False" in _text(nb)  # a full run, not the tests' smoke run


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
  nb = _execute("quickstart.ipynb", tmp_path)
  text = _text(nb)
  assert "FAST=True" in text  # the kernel saw the FAST switch
  assert "test accuracy" in text


@pytest.mark.slow
def test_kernels_runs(tmp_path):
  nb = _execute("kernels.ipynb", tmp_path)
  text = _text(nb)
  assert "FAST=True" in text
  assert "pallas_tpu" in text and "pallas_triton" in text


@pytest.mark.slow
def test_programmable_runs(tmp_path):
  nb = _execute("programmable.ipynb", tmp_path)
  text = _text(nb)
  assert "FAST=True" in text
  assert "traced 1 time(s)" in text and "max |decode step - full forward" in text
