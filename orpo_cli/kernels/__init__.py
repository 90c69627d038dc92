"""The training step's speed paths, in one room (see orpo_cli/kernels/paths.py for the list).

``apply_speed_paths(model, device=..., dtype=..., adapter=..., setting=...)`` installs the ones verified for the
device, the dtype and the model's type and returns what it applied and skipped (``.applied``, ``.skipped``,
``.line()``) and ``.undo()``; the result is also a context manager that undoes them on exit.
"""

from __future__ import annotations

from orpo_cli.kernels.paths import STEP_PATHS, SpeedPath, SpeedPaths, apply_speed_paths

__all__ = ["STEP_PATHS", "SpeedPath", "SpeedPaths", "apply_speed_paths"]
