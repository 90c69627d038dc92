"""Sizes, FLOP counts and durations: the units the planner reads (--gpu-memory) and prints."""

from __future__ import annotations

from orpo_cli.errors import UserError

GIB = 2**30
MIB = 2**20


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of '24GiB', '24 GB', '80gib', '16000MiB' (GB = 10^9 bytes, GiB = 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text or "")
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(
            f"--gpu-memory: cannot read {text!r}; give a positive size with a unit, e.g. 24GiB, 80GB or 16000MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def human_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
