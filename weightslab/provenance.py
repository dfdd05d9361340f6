"""Who wrote a checkpoint or an experiment record, and when: the versions of the software, and a
UTC timestamp precise enough to order commits (file times are not kept by copies of a root)."""

from __future__ import annotations

import datetime as _dt
import platform
import time

import torch

from ._version import __version__

__all__ = ["now", "versions"]


def now() -> tuple[str, int]:
    """The time now: ISO-8601 in UTC (to the microsecond, ``Z``-suffixed) and nanoseconds since the epoch."""
    ns = time.time_ns()
    iso = _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat(timespec="microseconds")
    return iso.replace("+00:00", "Z"), ns


def versions() -> dict[str, str]:
    """The versions of weightslab, torch and Python of this process."""
    return {"weightslab": __version__, "torch": torch.__version__, "python": platform.python_version()}
