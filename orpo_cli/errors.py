"""User-facing errors: one clear line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix; the CLI prints str(err) on one line and exits with code 2."""


class RunFailed(Exception):
    """A run that started but cannot go on (e.g. the loss diverged); the CLI prints one line and exits 1."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the CLI says how to resume (exit 130)."""

    def __init__(self, step: int, checkpoint: object):
        super().__init__(
            f"interrupted at step {step}; checkpoint saved to {checkpoint}; continue with --resume"
        )
        self.step = step
