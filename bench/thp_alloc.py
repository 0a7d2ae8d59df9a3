"""What fresh memory costs torch on this CPU, with and without transparent huge pages: allocate and
fill ten 1 GiB fp32 tensors, twice, and report wall seconds, minor page faults and system CPU
seconds of each round. PyTorch backs CPU allocations of 2 MB or more with huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before its first allocation (the kernel's THP mode must be `always`
or `madvise`: /sys/kernel/mm/transparent_hugepage/enabled).

    THP_MEM_ALLOC_ENABLE=0 .venv/bin/python bench/thp_alloc.py
    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/thp_alloc.py
"""
import os
import resource
import time

import torch


def round_(n: int = 10, mb: int = 1024) -> tuple[float, int, float]:
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        x = torch.empty(mb * 2 ** 20 // 4, dtype=torch.float32)
        x.fill_(1.0)
        del x
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime


if __name__ == "__main__":
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}")
    for i in range(2):
        s, faults, sys_s = round_()
        print(f"round {i}: {s:.2f} s, {faults} minor faults, {sys_s:.2f} s system")
