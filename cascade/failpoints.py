"""Failpoints for fault tests: the process dies (os._exit(137), as under kill -9) at a named point of a write.

    CASCADE_FAILPOINT=commit:3 python -m cascade +stage=4b models=tiny    # dies at the 3rd commit of this process
    CASCADE_FAILPOINT=checkpoint:1@/tmp/once ...                          # once: not again after /tmp/once exists

Points: write (a file written, before its rename), commit (a step's files in place, before its commit), manifest
(before the manifest is rewritten), checkpoint (a checkpoint written, before its rename). Unset, a call costs one
dictionary lookup.
"""

from __future__ import annotations

import collections
import os

_hits: collections.Counter = collections.Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("CASCADE_FAILPOINT")
    if not spec:
        return
    want, _, rest = spec.partition(":")
    if want != name:
        return
    count, _, once = rest.partition("@")
    _hits[name] += 1
    if _hits[name] != int(count or 1):
        return
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os._exit(137)
