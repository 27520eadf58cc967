"""README's "Programmable attention" and "Dynamic sparsity": every code block runs as
written, in order, in one namespace per section (softcap, ALiBi with learned slopes on
packed documents, a T5 bias table trained with optax, prefix-LM and predicates,
decoding; top-p tiles and permuted attention), and does what the text says."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_section(title: str, num_blocks: int) -> dict:
  text = (ROOT / "README.md").read_text()
  start = text.index(f"## {title}\n")
  end = text.find("\n## ", start + 1)
  section = text[start : end if end != -1 else len(text)]
  blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
  assert len(blocks) == num_blocks
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  return namespace


def test_readme_programmable_snippets_run_as_written(capsys):
  namespace = _run_section("Programmable attention", 5)
  out = capsys.readouterr().out
  assert "d loss / d slopes:" in out
  losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
  assert len(losses) == 4 and losses[-1] < 0.2 * losses[0], losses  # the table was learned
  docs, causal = namespace["docs"], namespace["causal"]
  assert docs.block_density() < causal.block_density()  # cross-document tiles skipped
  for name in ("out", "full", "target"):
    assert np.isfinite(np.asarray(namespace[name])).all(), name


def test_readme_dynamic_sparsity_snippet_runs_as_written():
  namespace = _run_section("Dynamic sparsity", 1)
  mask = namespace["mask"]
  counts = np.asarray(mask.kv_count)  # [1, heads, Qb]
  causal = np.arange(1, counts.shape[-1] + 1)
  assert (counts >= 1).all() and (counts <= causal).all()
  for name in ("out", "clustered"):
    value = np.asarray(namespace[name])
    assert value.shape == (1, 1024, 4, 64) and np.isfinite(value).all(), name
