"""runtime.host_memory: freed host memory stays in the process (no page faults per step) or not."""

import platform
import subprocess
import sys

import pytest

from skippipe.config import load_config
from skippipe.errors import ConfigError

# a step's pattern: hold 8 activations of 4 MiB (microbatches in flight), then free them all; ten
# steps. Prints the minor page faults of the last nine
PROBE = """
import resource, sys, torch
from skippipe.process import set_host_memory
took = set_host_memory(sys.argv[1])
def step():
    held = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(policy: str):
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    return took == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy sets glibc's malloc thresholds")
def test_retain_stops_the_page_faults_of_each_large_allocation():
    took, retained = probe("retain")
    untouched, system = probe("system")
    assert took and not untouched
    # glibc's default trims the heap once the step's tensors are freed (its trim threshold follows
    # the largest block freed), so the steps fault pages in anew: measured 9,188-73,445 (9 steps of
    # 8 x 1024 pages at most; at least most of one 1024-page tensor per step), against 0-1,024 retained
    assert system >= 9 * 900, system
    assert retained < system / 5, (retained, system)


def test_a_bad_policy_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="runtime.host_memory='always' is not one of retain, system"):
        load_config(None, ["runtime.host_memory=always"])
