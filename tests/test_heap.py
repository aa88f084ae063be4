"""The C heap after a load, and the child processes a loaded run must not start."""

import subprocess
import sys
import textwrap

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
