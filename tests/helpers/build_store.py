"""Build (or reuse) a corpus's token store in this process and print its stats as JSON.

    python build_store.py TOKENIZER_FOLDER CORPUS CACHE_DIR [--data-limit-mb N] [--adapt CONFIG]

With --data-limit-mb, the process's data segment (heap and private memory) is limited to what
it uses after its imports plus N MiB before anything is read: a corpus whose tokens would not
fit must stream. With --adapt, it then runs `ecoadapt adapt CONFIG` under the same limit.
"""

import json
import resource
import sys
from pathlib import Path

from transformers import AutoTokenizer

from ecoadapt.cli import main
from ecoadapt.config import DataConfig
from ecoadapt.data import corpus


def vm_data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData")


def run() -> None:
    args = sys.argv[1:]
    tokenizer_folder, corpus_path, cache = args[:3]
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    if "--data-limit-mb" in args:
        limit = vm_data_bytes() + int(args[args.index("--data-limit-mb") + 1]) * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    cfg = DataConfig(train=[corpus_path], max_seq_len=32, eval_fraction=0.05, cache_dir=cache)
    built = corpus.build(cfg, tok, "clm")
    print(json.dumps({k: v for k, v in built.stats.items() if k != "sources"}), flush=True)
    if "--adapt" in args:
        sys.exit(main(["adapt", args[args.index("--adapt") + 1]]))


if __name__ == "__main__":  # spawned tokenization workers import this module: they must not run it
    run()
