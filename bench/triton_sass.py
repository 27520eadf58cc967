r"""Offline SASS of the Triton block-sparse kernels: no GPU needed.

Two steps, in two environments:

  1. dump (this repository's venv): lower forward + dQ + dK/dV for CUDA on this host
     (an abstract H200 stands in for the GPU) and write each kernel's Triton IR with
     the num_warps / num_stages the kernel asks for:
       .venv/bin/python bench/triton_sass.py dump OUT_DIR [--main_src DIR]
     `--main_src` puts another checkout of the package first on sys.path (a folder
     holding `sparse_attention/`), e.g. main's files from `git archive main`.
  2. compile (a scratch venv with upstream Triton, `pip install triton`, and a CUDA
     ptxas): compile each .ttir for sm_90a, then count SASS per tile loop (the
     backward branches around HGMMA instructions), registers and spills:
       TRITON_PTXAS_BLACKWELL_PATH=$(which ptxas) python bench/triton_sass.py compile OUT_DIR

Shape: B1 S16384 H16 D128 bf16, 128x128 tiles; masks: a dense layout (no element
mask) and causal (full tiles, then masked diagonal tiles). XLA compiles the same IR
with its own pinned Triton, so the schedule is a close proxy, not proof.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

KINDS = ("HGMMA", "FFMA", "FADD", "FMUL", "MUFU", "FSEL", "ISETP", "IMAD", "LDGSTS", "LDL", "STL")


def dump(out_dir: str) -> None:
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import pallas_call_registration as registration

  from sparse_attention.ops import masks
  from sparse_attention.pallas_kernels.block_sparse import gpu

  captured = {}
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = lower(jaxpr, *args, **kwargs)
    captured[result.module.operation.attributes["sym_name"].value] = str(result.module)
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  seq, heads, dim = 16384, 16, 128
  q = jax.ShapeDtypeStruct((1, seq, heads, dim), jnp.bfloat16)
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
  os.makedirs(out_dir, exist_ok=True)
  for name, mask in {
    "dense": masks.dense(seq, seq, block_q=128, block_kv=128),
    "causal": masks.causal(seq, seq, block_q=128, block_kv=128),
  }.items():

    def loss(q, k, v, m):
      out = gpu.block_sparse_attention_triton(q, k, v, m, scale=dim**-0.5)[0]
      return out.astype(jnp.float32).sum()

    captured.clear()
    with jax.sharding.use_abstract_mesh(mesh):
      text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(q, q, q, mask)
        .lower(lowering_platforms=("cuda",))
        .as_text()
      )
    for call in re.finditer(r"custom_call @\"?__gpu\$xla\.gpu\.triton.*", text):
      line = call.group(0)
      kernel = re.search(r'name = "(\w+)"', line).group(1)
      params = {
        p: int(re.search(rf"{p} = (\d+)", line).group(1)) for p in ("num_warps", "num_stages")
      }
      base = os.path.join(out_dir, f"{name}_{kernel}")
      with open(base + ".ttir", "w") as f:
        f.write(captured[kernel])
      with open(base + ".json", "w") as f:
        json.dump(params, f)
      print(base, params)
  print("jax", jax.__version__)


def _opcode(text: str) -> str:
  return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def compile_and_count(out_dir: str) -> None:
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia import compiler as nvidia

  ptxas = nvidia.get_ptxas(90).path
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
  version = subprocess.check_output([ptxas, "--version"], text=True).splitlines()[-1]
  print(f"triton {triton.__version__}; ptxas {version}")
  head = ["kernel", "stages", "SMEM B", "regs", "spill st/ld B", "loop", "SASS", *KINDS]
  print("| " + " | ".join(head) + " |")
  names = [f[:-5] for f in os.listdir(out_dir) if f.endswith(".ttir") and ".src." not in f]
  for name in sorted(names):
    base = os.path.join(out_dir, name)
    with open(base + ".json") as f:
      params = json.load(f)
    with open(base + ".ttir") as f:
      source = re.sub(r"^module @\w+", "module", f.read(), count=1)  # upstream: unnamed
    with open(base + ".src.ttir", "w") as f:
      f.write(source)
    kernel = triton.compile(base + ".src.ttir", target=GPUTarget("cuda", 90, 32), options=params)
    for ext in ("ttgir", "ptx"):
      with open(f"{base}.{ext}", "w") as f:
        f.write(kernel.asm[ext])
    with open(base + ".cubin", "wb") as f:
      f.write(kernel.asm["cubin"])
    log = subprocess.run(
      [ptxas, "-v", "-arch=sm_90a", base + ".ptx", "-o", os.devnull], capture_output=True, text=True
    ).stderr
    regs = re.search(r"Used (\d+) registers", log).group(1)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    sass = subprocess.run([cuobjdump, "-sass", base + ".cubin"], capture_output=True, text=True)
    code = [
      (int(m.group(1), 16), m.group(2).strip())
      for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass.stdout)
    ]
    loops = set()
    for address, text in code:
      op = _opcode(text)
      target = re.search(r"0x([0-9a-f]+)", text.split(op, 1)[1]) if op.startswith("BRA") else None
      if target and int(target.group(1), 16) <= address:
        loops.add((int(target.group(1), 16), address))
    for number, (lo, hi) in enumerate(sorted(loops)):
      ops = [_opcode(t) for a, t in code if lo <= a <= hi and _opcode(t) != "NOP"]
      count = collections.Counter(op.split(".")[0] for op in ops)
      if count["HGMMA"]:
        row = [name, params["num_stages"], kernel.metadata.shared, regs, "/".join(spills)]
        row += [number, len(ops), *(count[k] for k in KINDS)]
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
  mode, out = sys.argv[1], sys.argv[2]
  if "--main_src" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--main_src") + 1])
  dump(out) if mode == "dump" else compile_and_count(out)
