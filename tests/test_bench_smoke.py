"""bench/block_sparse_gpu.py imports and its correctness part runs on CPU (--smoke:
both GPU kernels interpreted at toy sizes, against the reference)."""

import subprocess
import sys

import testutil


def test_block_sparse_gpu_bench_smoke():
  script = testutil.ROOT / "bench" / "block_sparse_gpu.py"
  run = subprocess.run(
    [sys.executable, str(script), "--smoke", "--check_len=130"],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=testutil.ROOT,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  for kernel in ("pallas_mosaic_gpu", "pallas_triton"):
    assert f"| {kernel} | causal, empty rows | bfloat16 | pass |" in run.stdout, run.stdout
