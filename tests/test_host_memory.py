"""distributed.host_memory: with glibc's defaults, large blocks freed between small live ones stay
resident (the dynamic mmap threshold moved them onto the heap); with `compact_host_heap` they go back
to the system. Each case runs in a fresh interpreter: the setting is per process and cannot be undone."""
import subprocess
import sys

import pytest

SCRIPT = """
import sys
import torch
from curvtrain.distributed.host_memory import compact_host_heap

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

if sys.argv[1] == "compact":
    assert compact_host_heap()
torch.empty(1 << 20).fill_(1)  # a 4 MiB block, mapped and freed: glibc now keeps blocks this size on its heap
before = rss_mib()
big, small = [], []
for _ in range(64):  # 64 × 4 MiB of temporaries, each followed by a small block that stays alive
    big.append(torch.empty(1 << 20).fill_(1))
    small.append(torch.ones(256))
del big
print(rss_mib() - before)
"""


def retained_mib(heap: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, heap], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_compact_heap_returns_freed_temporaries():
    assert retained_mib("glibc") > 128  # of the 256 MiB freed: the fragmentation the setting exists for
    assert retained_mib("compact") < 16
