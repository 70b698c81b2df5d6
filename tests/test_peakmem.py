"""The benchmarks' peak-memory sampler: a child's peak is seen even after it has freed it, by its
kind."""

from __future__ import annotations

import subprocess
import sys

from cascade.peakmem import PeakMemory


def test_a_childs_peak_is_kept_by_kind():
    grow = ("import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); del b; "
            "time.sleep(1.5)")
    with PeakMemory(every=0.1) as peak:
        subprocess.run([sys.executable, "-c", grow], check=True)
    mb = peak.megabytes()
    assert mb["driver"] > 0  # this process
    child = max(v for k, v in mb.items() if k.startswith("python"))
    assert child >= 300, mb  # its high-water mark, read after it had freed the buffer
