"""The C heap after a load, the huge pages torch is asked for, and the child processes a loaded run must not start."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ecoadapt.core import heap

RETAINED = """
import sys, psutil, torch
from ecoadapt.core import heap

def pattern():
    # A 30 MiB block freed raises glibc's threshold to it; the blocks after it then come from the
    # heap, each freed below a small block that outlives it: a hole the next, larger one cannot use.
    keep, base = [], psutil.Process().memory_info().rss
    big = torch.ones(30 << 18); del big
    for i in range(1, 25):
        block = torch.ones(i << 18)
        keep.append(torch.ones(2000))
        del block
    return (psutil.Process().memory_info().rss - base) / 2**20

torch.ones(1 << 20)
if sys.argv[1] == "mapped":
    with heap.large_blocks_mapped():
        print(pattern())
else:
    print(pattern())
"""


def retained_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip())


def test_blocks_freed_inside_large_blocks_mapped_leave_the_resident_set():
    assert retained_mib("heap") > 12  # glibc's own way keeps the freed blocks resident
    assert retained_mib("mapped") < 4


def test_a_loaded_run_starts_no_child_to_describe_its_machine_or_trim_its_heap():
    """A child started while the model is loaded shares its pages for an instant (vfork), and a
    sampler summing the process tree's resident sets counts them twice."""
    script = textwrap.dedent(
        """
        import subprocess, torch
        from ecoadapt.core import heap
        from ecoadapt.measure import environment

        environment.read_before_loading()

        def no_child(*args, **kwargs):
            raise AssertionError(f"a child process after loading: {args[1] if len(args) > 1 else args}")

        subprocess.Popen.__init__ = no_child
        env = environment.describe(torch.device("cpu"))
        heap.release_freed()
        print(env["platform"])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("Linux")


HUGE_PAGES = """
import sys
from ecoadapt.core import heap

asked = heap.huge_pages_for_torch()
import torch

block = torch.empty(8 << 20, dtype=torch.uint8)  # 8 MiB: above torch's 2 MiB floor for huge pages
where = block.data_ptr()
eligible = None
with open("/proc/self/smaps") as smaps:
    inside = False
    for line in smaps:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= where < end
        elif inside and head == "THPeligible:":
            eligible = line.split()[1]
print(asked, eligible)
"""


def _huge_pages_run(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != heap.TORCH_HUGE_PAGES}
    done = subprocess.run(
        [sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True, timeout=120, env={**base, **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="the kernel decides alone unless THP is in madvise mode")
def test_torch_tensors_get_huge_pages_when_asked_before_torch_loads_and_a_users_choice_is_kept():
    assert _huge_pages_run() == ["True", "1"]  # the block's mapping may use 2 MiB pages
    assert _huge_pages_run(THP_MEM_ALLOC_ENABLE="0") == ["False", "0"]  # the user's 0 is kept


ADAPT_ASKS = """
import os, sys
from ecoadapt.cli import main

quantize = sys.argv[1]
overrides = ["model.name_or_path=/nonexistent/model", "output.dir=" + sys.argv[2]]
if quantize != "none":
    overrides += ["lora.enabled=true", "lora.quantize=" + quantize]
status = main(["adapt", "quickstart", *(x for o in overrides for x in ("--set", o))])
print("refused:", status == 2)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


@pytest.mark.parametrize(("quantize", "asked"), [("nf4", "1"), ("int8", "1"), ("none", "None")])
def test_adapt_asks_for_huge_pages_for_a_quantized_base_only_before_torch_loads(tmp_path, quantize, asked):
    base = {k: v for k, v in os.environ.items() if k != heap.TORCH_HUGE_PAGES}
    done = subprocess.run(
        [sys.executable, "-c", ADAPT_ASKS, quantize, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=base,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "/nonexistent/model" in done.stderr  # refused when the model is looked for: after the decision
    assert done.stdout.split()[-3:] == ["refused:", "True", asked]


def test_a_childs_environment_asks_for_huge_pages_and_keeps_a_users_value():
    assert heap.with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", heap.TORCH_HUGE_PAGES: "1"}
    assert heap.with_huge_pages({heap.TORCH_HUGE_PAGES: "0"}) == {heap.TORCH_HUGE_PAGES: "0"}


@pytest.mark.parametrize(("quantize", "asked"), [("nf4", "1"), (None, None)])
def test_plans_trial_steps_of_a_quantized_base_run_as_adapt_runs_it(monkeypatch, quantize, asked):
    """Each trial runs in a child that imports torch first thing: the variable must be in its
    environment, for a quantized base only (a non-quantized recipe's trial inherits as before)."""
    from ecoadapt.config import from_dict
    from ecoadapt.core.errors import UserError
    from ecoadapt.core.processes import ChildResult
    from ecoadapt.forecast import planner

    monkeypatch.delenv(heap.TORCH_HUGE_PAGES, raising=False)
    seen = []

    def child(command, env=None, **kwargs):
        seen.append((command, env))
        return ChildResult(code=1, tail=["no model here"])

    monkeypatch.setattr(planner, "run_child", child)
    lora = {"enabled": True, "r": 4, **({"quantize": quantize} if quantize else {})}
    cfg = from_dict(
        {"model": {"name_or_path": "/nowhere"}, "data": {"train": ["builtin:python-docstrings"]}, "lora": lora}
    )
    with pytest.raises(UserError, match="no model here"):
        planner._run_trials(cfg, [1])
    ((command, env),) = seen
    assert command[2] == "ecoadapt.forecast.trial_steps"
    assert (env or {}).get(heap.TORCH_HUGE_PAGES) == asked
