"""Start-up cost: seconds to import optrush's modules in a fresh interpreter, and whether torch's compiler came along.

    git archive b00362d optrush | tar x -C /tmp/before      # a snapshot of the code to compare with
    python benchmarks/import_time.py --src before=/tmp/before --src after=. --repeats 5 --name import_time_cpu

Each `--src NAME=DIR` puts DIR (a folder holding the `optrush` package) first on the path of a fresh `python -c`
that times `import torch` and then `import MODULE` (what every `optrush` command and subprocess pays before doing
anything), and records whether `torch._dynamo` / `torch._inductor.compile_fx` were imported. Sources alternate
within each repeat, so both see the same machine load; the table gives the median over the repeats and the ratio
of each source's median to the first's. Writes <name>.json and <name>.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optrush.bench.provenance import provenance, provenance_line, write_result  # noqa: E402

MODULES = ("optrush.cli.main", "optrush.train.loop", "optrush.generate", "optrush.objectives.dpo", "optrush.plan")
PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
import {module}
print(json.dumps({{"torch_s": torch_s, "total_s": time.perf_counter() - start,
                  "dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor.compile_fx" in sys.modules}}))
"""


def time_import(module: str, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as elsewhere:  # not the checkout: only `src` provides optrush
        done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=env, cwd=elsewhere,
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="import_time_cpu")
    args = ap.parse_args()
    sources = dict(item.split("=", 1) for item in args.src)
    runs = {(name, module): [] for name in sources for module in MODULES}
    for _ in range(args.repeats):
        for module in MODULES:
            for name, src in sources.items():
                runs[name, module].append(time_import(module, Path(src).resolve()))
    rows = []
    for module in MODULES:
        first = None
        for name in sources:
            samples = runs[name, module]
            median = statistics.median(r["total_s"] for r in samples)
            first = first or median
            rows.append({"module": module, "source": name, "median_s": median, "ratio_to_first": median / first,
                         "torch_median_s": statistics.median(r["torch_s"] for r in samples),
                         "dynamo": samples[0]["dynamo"], "inductor": samples[0]["inductor"], "samples": samples})
    p = provenance()
    lines = [f"# Import time of optrush's modules ({args.repeats} repeats, sources alternating)", "",
             provenance_line(p), f"- sources: {', '.join(f'{n} = {s}' for n, s in sources.items())}", "",
             "| module | source | median s | × first source | of which torch s | dynamo loaded | Inductor loaded |",
             "|---|---|---:|---:|---:|---|---|"]
    lines += [f"| {r['module']} | {r['source']} | {r['median_s']:.2f} | {r['ratio_to_first']:.2f} | "
              f"{r['torch_median_s']:.2f} | {'yes' if r['dynamo'] else 'no'} | {'yes' if r['inductor'] else 'no'} |"
              for r in rows]
    write_result({"provenance": p, "sources": sources, "repeats": args.repeats, "rows": rows},
                 "\n".join(lines) + "\n", out=args.out, name=args.name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
