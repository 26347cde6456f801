"""``fedoap bench scale``: the large federation's site layout and the process-tree memory sampler."""

import subprocess
import sys

import pytest

from fedoap.bench_scale import PeakMemory, scale_sites, scale_table
from fedoap.data import DEFAULT_SITES


def test_scale_sites_cycle_organs_with_unequal_sizes():
    sites = scale_sites(30, smallest=0.25, seed=0)
    assert len(sites) == 30 and list(sites)[:4] == ["brain-01", "liver-01", "breast-01", "brain-02"]
    organs = [organ for organ, _ in sites.values()]
    assert {o: organs.count(o) for o in set(organs)} == {"brain": 10, "liver": 10, "breast": 10}
    for organ, n_cases in sites.values():
        full = DEFAULT_SITES[organ][1]
        assert max(3, round(0.25 * full)) <= n_cases <= full
    for organ in ("brain", "liver", "breast"):
        assert len({n for o, n in sites.values() if o == organ}) > 3  # unequal sizes within an organ
    assert scale_sites(30, seed=0) == sites and scale_sites(30, seed=1) != sites
    with pytest.raises(ValueError, match="smallest"):
        scale_sites(3, smallest=0)


def test_peak_memory_counts_child_processes():
    # every page written (a zero-filled buffer may stay unmapped), held long enough for several samples
    # (1 GB, so that the machine-wide figure stands out of what other processes free meanwhile: ~100 MB seen here)
    code = "import time; b = b'x' * (1024 * 2**20); time.sleep(2.0)"
    with PeakMemory(interval_s=0.05) as peak:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert peak.peak_processes >= 2
    assert peak.peak_bytes > 1024 * 2**20  # the child's 1 GB buffer is in the sum
    assert peak.peak_used_increase_bytes > 512 * 2**20  # and the machine's used memory rose meanwhile


def test_scale_table_has_one_row_per_method():
    row = {"method": "fedavg", "sites": 30, "wall_time_s": 100.0, "mean_round_seconds": 12.5,
           "peak_rss_bytes": 3 * 2**30, "peak_system_used_increase_bytes": 2**30, "peak_processes": 33,
           "mean_dice": 0.5, "worst_site_dice": 0.0,
           "bytes_uploaded_per_round_per_site": 3.1e6}
    lines = scale_table([row, {**row, "method": "fedoap"}]).splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["fedavg", "30"] and "3.00" in lines[1]
    assert lines[1].split()[-2] == "0.000"  # a worst site at Dice 0 is a number, not a missing value
