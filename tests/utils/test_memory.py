"""fss.utils.memory: glibc keeps large freed blocks for reuse once retain_freed_memory() ran."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.helpers.config import ROOT

PROBE = """
import sys
sys.path.insert(0, {src!r})
import torch
from fss.utils.memory import retain_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if {retain}:
    assert retain_freed_memory() and retain_freed_memory()  # applied, idempotent
before = rss_mib()
block = torch.ones(64, 2**20)  # 256 MiB, touched
del block
print(rss_mib() - before)
"""


def _retained_mib(retain: bool) -> float:
    code = PROBE.format(src=str(ROOT / "src"), retain=retain)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc's")
def test_freed_large_tensor_stays_in_the_process_only_when_retained():
    assert _retained_mib(retain=False) < 64  # glibc's default: the mmap'd block is unmapped
    assert _retained_mib(retain=True) > 192  # kept in the heap for the next episode


def test_config_switch_is_on_by_default(compose_cfg):
    assert compose_cfg().retain_freed_memory is True
    assert compose_cfg(["retain_freed_memory=false"]).retain_freed_memory is False
