"""Failpoints for fault tests: the process dies (os._exit(137), as under kill -9) at a named point
of a write, or the write fails as on a full disk.

    CASCADE_FAILPOINT=commit:3 python -m cascade +stage=4b models=tiny  # dies at the 3rd commit
    CASCADE_FAILPOINT=checkpoint:1@/tmp/once ...  # once: not again after /tmp/once exists
    CASCADE_FAILPOINT=write:7!enospc ...          # the 7th write fails: no space left
    CASCADE_FAILPOINT=fuse:1!corrupt ...          # the 1st fused model saved is damaged

Points: write (a file written, before its rename), commit (a step's files in place, before its
commit), manifest (before the manifest is rewritten), checkpoint (a checkpoint written, before its
rename), fuse (a fused model saved, before its check; with !corrupt the caller damages it), score (a
teacher's replica asked for on_policy's scores: the replica dies). Unset, a call costs one
dictionary lookup.
"""

from __future__ import annotations

import collections
import errno
import os
import threading

_hits: collections.Counter = collections.Counter()


def failpoint(name: str, path: str = "") -> str | None:
    """Dies, or raises ENOSPC, when `name` is armed and due; an other action is returned for the
    caller to do."""
    spec = os.environ.get("CASCADE_FAILPOINT")
    if not spec:
        return None
    spec, _, action = spec.partition("!")
    want, _, rest = spec.partition(":")
    if want != name:
        return None
    count, _, once = rest.partition("@")
    if threading.current_thread().name == "cascade-lease":
        # the heartbeat's timing would make counts random
        return None
    _hits[name] += 1
    if _hits[name] != int(count or 1):
        return None
    if once:
        if os.path.exists(once):
            return None
        open(once, "w").close()
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    if action:
        return action
    os._exit(137)
