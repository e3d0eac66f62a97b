"""keep_freed_memory: large tensors reuse freed memory instead of faulting in fresh pages (ssl_distill/memory.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from ssl_distill.memory import keep_freed_memory

FAULTS = """
import json, resource
import torch
from ssl_distill.memory import keep_freed_memory

def faults_per_64mib_tensor(n=20):
    counts = []
    for _ in range(n):  # a 64 MiB tensor made, filled and freed, n times: what each training step does
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(2**24)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del x
    return counts

default = faults_per_64mib_tensor()
applied = keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "kept": faults_per_64mib_tensor()}))
"""


def test_a_freed_large_tensor_is_reused_without_page_faults():
    """glibc maps each 64 MiB tensor fresh (16,384 pages, each a fault, unless the kernel backs it with huge pages);
    after keep_freed_memory the heap grows for the first few and then every new tensor reuses freed pages (here:
    16,385 faults each before; after, 16,384 for the first 2-8 and none from then on)."""
    out = json.loads(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout)
    assert out["applied"] is True
    assert max(out["kept"][-10:]) < 1000, out


def test_the_users_own_malloc_settings_are_left_as_set(monkeypatch):
    keep_freed_memory.cache_clear()
    try:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
        assert keep_freed_memory() is False
        keep_freed_memory.cache_clear()
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
        monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
        assert keep_freed_memory() is False
    finally:
        keep_freed_memory.cache_clear()
