"""A driver as far as the lease goes, for tests/test_lease.py: takes the run directory's lease, then
either holds it for a while or commits a manifest entry every 0.2 s (each fenced, as the driver's
are) until it is stopped.

    python tests/lease_holder.py RUN_DIR TTL [--go FILE] [--hold S] [--ticks] [--other-host]

Prints HELD <generation> / BUSY <why> / LOST <why>; exits 0, 2 (busy) or 3 (lease lost).
--other-host: this process reads as another host's (its node id changed), so only its heartbeat
tells others it lives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cascade import lease as L
from cascade.rundir import RunDir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("ttl", type=float)
    ap.add_argument("--go", default="",
                    help="print READY, then start once this file exists (simultaneous starts)")
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--ticks", action="store_true")
    ap.add_argument("--other-host", action="store_true")
    a = ap.parse_args()
    if a.other_host:
        L.node_id = lambda: "another-host/pid:[1]"
    rd = RunDir(a.run_dir)
    if a.go:
        print("READY", flush=True)
        while not os.path.exists(a.go):
            time.sleep(0.001)
    lease = L.Lease(rd, a.ttl)
    try:
        lease.acquire()
    except L.RunDirBusy as e:
        print("BUSY", e, flush=True)
        return 2
    print("HELD", lease.gen, flush=True)
    try:
        if a.hold:
            time.sleep(a.hold)
        n = 0
        while a.ticks:
            try:
                rd.mark(f"tick-{n:05d}", "done", at=time.time())
                n += 1
            except L.LeaseLost:
                raise
            except Exception as e:  # the store away: try again, as the driver's steps would
                print("RETRY", type(e).__name__, flush=True)
            time.sleep(0.2)
    except (L.LeaseLost, KeyboardInterrupt) as e:
        print("LOST", lease.lost or e, flush=True)
        return 3
    finally:
        lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
