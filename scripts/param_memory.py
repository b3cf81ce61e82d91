"""Parameter bytes per device of a model on several meshes, from the abstract params' shardings (no allocation).

  python scripts/param_memory.py --family flux --size dev                     # FLUX.1-dev, fp32 and bf16
  python scripts/param_memory.py --family flux --size dev --mesh 1,8,1 --mesh 1,2,4 --rules '[["embed", "fsdp"]]'

A mesh is (data, fsdp, tensor); --size names a constructor of the family's config (FluxConfig.dev, ...).
The devices are fake CPU ones (up to 64), so it runs anywhere. Params only: activations,
optimizer state and the text encoders / VAE come on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="flux")
  parser.add_argument("--size", default="dev", help="config constructor (dev, schnell, tiny, ...)")
  parser.add_argument("--mesh", action="append", help="data,fsdp,tensor (repeatable; default 1,8,1 1,4,2 1,2,4)")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--rules", help="JSON [[logical name, mesh axes], ...] (default sharding.DEFAULT_RULES)")
  args = parser.parse_args(argv)
  meshes = [tuple(int(v) for v in m.split(",")) for m in (args.mesh or ["1,8,1", "1,4,2", "1,2,4"])]

  import flax.linen as nn
  import jax

  from unimm_jax import registry, sharding

  fam = registry.family(args.family)
  if not hasattr(fam.config_cls, args.size):
    raise SystemExit(f"param_memory: {fam.config_cls.__name__} has no constructor {args.size!r}")
  rules = sharding.rules_from_config(json.loads(args.rules)) if args.rules else sharding.DEFAULT_RULES
  rows = []
  for dtype in args.dtypes:
    cfg = getattr(fam.config_cls, args.size)(param_dtype=dtype)
    boxed = jax.eval_shape(fam.module(cfg).init, jax.random.key(0), *fam.example_inputs(cfg))["params"]
    abstract = nn.meta.unbox(boxed)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    for shape in meshes:
      mesh = sharding.make_mesh(shape, devices=jax.devices()[:math.prod(shape)])
      shardings = sharding.logical_shardings(boxed, mesh, rules)
      rows.append(dict(mesh=shape, dtype=dtype, total_gib=total / 2**30,
                       per_device_gib=sharding.bytes_per_device(abstract, shardings) / 2**30,
                       replicated=sharding.replicated_fraction(abstract, shardings)))
  n = sum(x.size for x in jax.tree.leaves(abstract))
  print(f"{args.family} {args.size}: {n / 1e9:.2f}B parameters")
  print("| mesh (data, fsdp, tensor) | dtype | total GiB | GiB per device | replicated |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mesh']} | {r['dtype']} | {r['total_gib']:.2f} | {r['per_device_gib']:.2f} | "
          f"{r['replicated']:.2%} |")
  return rows


if __name__ == "__main__":
  import jax
  jax.config.update("jax_platforms", "cpu")       # shapes only: fake CPU devices, as many as a mesh needs
  jax.config.update("jax_num_cpu_devices", 64)
  main()
