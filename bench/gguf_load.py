"""Loading a GGUF model: transformers' reader at every load, against ecoadapt's copy converted
once (model/gguf_cache.py) and then read lean like any folder.

Each load runs in a fresh process (its resident peak is its own: ``ru_maxrss``), in the recipe
of a bf16 LoRA run (the frozen base read in bf16), alternating the two ways ``--repeats`` times;
the one-time conversion is timed apart. Torch's and transformers' imports are in every process
alike (the figures compare the loads, the import is the same baseline in both).

    python bench/gguf_load.py --model pkg:gemma3-270m    # about 5 minutes on 2 cores

Results: bench/results/gguf_load.json (medians, and every repeat).
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

HERE = Path(__file__).resolve().parent
CHILD = """
import json, resource, sys, time
from ecoadapt.config import ModelConfig
from ecoadapt.model import gguf_cache, pretrained
from ecoadapt.model.load_spec import Recipe
name, way = sys.argv[1], sys.argv[2]
if way == "gguf":  # transformers' GGUF reader, as every load did before
    gguf_cache.lean = lambda where, gguf_file: (where, gguf_file)
start = time.perf_counter()
loaded = pretrained.load(ModelConfig(name), 128, recipe=Recipe("bf16", frozen_base=True))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"way": way, "seconds": seconds, "peak_bytes": peak,
                  "weights_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters())}))
"""


def load(model: str, way: str, cache: Path) -> dict[str, float]:
    """One load in a fresh process: its seconds and resident peak."""
    env = {**os.environ, "ECOADAPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", CHILD, model, way]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg:gemma3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gguf_load.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ecoadapt-gguf-") as tmp:
        cache = Path(tmp)
        first = load(args.model, "converted", cache)  # converts, then loads
        runs = [load(args.model, way, cache) for _ in range(args.repeats) for way in ("gguf", "converted")]
    by_way = {w: [r for r in runs if r["way"] == w] for w in ("gguf", "converted")}
    median = {
        w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_bytes")} for w, rs in by_way.items()
    }
    result = {
        "model": args.model,
        "first_load_with_conversion": first,
        "median": median,
        "ratio": {k: median["converted"][k] / median["gguf"][k] for k in ("seconds", "peak_bytes")},
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for way, m in median.items():
        print(f"{way}: {m['seconds']:.1f} s, peak {m['peak_bytes'] / 2**30:.2f} GiB")
    print(f"first load (converting once): {first['seconds']:.1f} s, peak {first['peak_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
