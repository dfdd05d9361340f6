"""How sizes are shown to people: bytes in decimal units (``1.5 MB``), the same in the command line
and on the page."""

from __future__ import annotations

__all__ = ["size"]


def size(n: float | None) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 kB"``, ``"301.4 MB"`` (decimal units); ``"-"`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
