"""A process's resident memory, as the benches measure it: now, and its own peak.

The peak is ``VmHWM`` from ``/proc/<pid>/status``, not ``getrusage``'s ``ru_maxrss``:
Linux carries ``ru_maxrss`` over from the parent at fork and exec, so a bench worker
started by a parent that once held a model would report the parent's size.
"""

from __future__ import annotations

import resource
from pathlib import Path


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The process's own peak resident set size (``VmHWM``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
