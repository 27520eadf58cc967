"""README's "Programmable attention": every code block runs as written, in order, in one
namespace (softcap, ALiBi with learned slopes on packed documents, a T5 bias table
trained with optax, prefix-LM and predicates, decoding), and does what the text says."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _section() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("## Programmable attention")
  end = text.find("\n## ", start + 1)
  return text[start : end if end != -1 else len(text)]


def test_readme_programmable_snippets_run_as_written(capsys):
  blocks = re.findall(r"```python\n(.+?)\n```", _section(), flags=re.S)
  assert len(blocks) == 5
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  out = capsys.readouterr().out
  assert "d loss / d slopes:" in out
  losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
  assert len(losses) == 4 and losses[-1] < 0.2 * losses[0], losses  # the table was learned
  docs, causal = namespace["docs"], namespace["causal"]
  assert docs.block_density() < causal.block_density()  # cross-document tiles skipped
  for name in ("out", "full", "target"):
    assert np.isfinite(np.asarray(namespace[name])).all(), name
