"""One writer per run directory: RUN/orpo-tune.lock names the process that writes the run.

Every verb that writes into a run (train and --resume, eval's eval.json, plot's PNG) holds the lock while it
works; a second one is refused with one line naming the holder. The file holds the holder's pid, host, verb
and start time. It is released when the verb ends, error or not; after a kill -9 it stays behind and is
recognised as stale because its pid is gone (or is now another process: the pid's start time is kept too).
A lock held by another host cannot be checked from here: the line says so and names the file to delete.

Taking the lock is made atomic by an flock on the run directory itself (where the file system offers it), so
two processes that find the same stale lock cannot both take it over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError, stage

LOCK_NAME = "orpo-tune.lock"


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


@contextlib.contextmanager
def writing_run(root: Path, verb: str, *, take: bool = True, blame: str | None = None) -> Iterator[None]:
    """Hold RUN's lock for `verb` inside the block; `take=False` (a worker whose launcher holds it, a rank other
    than 0) holds nothing. A directory this creates for its lock is removed again if it ends up holding
    nothing else (a refused train leaves nothing on disk). `blame`: the setting a file-system error names."""
    if not take:
        yield
        return
    root = Path(root)
    created = [p for p in (root, *root.parents) if not p.exists()]  # what mkdir will create, deepest first
    with stage("locking the run directory", blame=blame):
        mine = acquire(root, verb)
    try:
        yield
    finally:
        if mine is not None:
            release(root, mine)
        for directory in created:
            try:
                directory.rmdir()  # only when empty: whatever the verb wrote stays
            except OSError:
                break


def writes_the_run(node_rank: int = 0) -> bool:
    """Whether this process of a training run is the one that writes the run directory (and so takes its lock):
    rank 0 of a launched run (torchrun, accelerate launch), else the launching process of machine 0."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return os.environ.get("RANK", "0") == "0"
    return node_rank == 0


def acquire(root: Path, verb: str) -> dict[str, Any] | None:
    """Take RUN's lock for `verb`, or raise UserError naming the process that holds it. Returns the record
    written (None when an ancestor of this process, e.g. the `--nproc` launcher, already holds it)."""
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    with _exclusive(root):
        holder = read_holder(path)
        if holder is not None and _alive(holder):
            if _is_ancestor(holder):
                return None
            raise UserError(_in_use(root, holder))
        mine = _record(verb)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # whole or absent: readers never see half
        tmp.write_text(json.dumps(mine) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # replaces a stale lock, if any
        return mine


def release(root: Path, mine: dict[str, Any]) -> None:
    """Remove RUN's lock if it is still the one `mine` wrote."""
    path = lock_path(root)
    holder = read_holder(path)
    if holder is not None and holder.get("pid") == mine["pid"] and holder.get("started") == mine["started"]:
        with contextlib.suppress(OSError):
            path.unlink()


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when there is no lock. An unreadable lock (a crash while writing it; it is written
    through a rename, so only a foreign file can be) counts as stale."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": socket.gethostname(), "verb": "?", "started": 0.0}
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {"pid": -1, "host": "?"}


def _record(verb: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "verb": verb,
        "started": time.time(),
        "pid_created": _created(os.getpid()),
    }


def _created(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), to tell a reused pid from the holder."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no such process, or psutil unavailable
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder still runs. A lock of another host is taken to be alive: it cannot be checked here."""
    if holder.get("host") != socket.gethostname():
        return holder.get("pid", -1) > 0
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    if _zombie(pid):
        return False  # killed, not yet reaped by its parent
    created, recorded = _created(pid), holder.get("pid_created")
    if created is not None and isinstance(recorded, int | float) and abs(created - recorded) > 1.0:
        return False  # the pid was reused by another process after the holder died
    return True


def _zombie(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _is_ancestor(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        import psutil

        return any(p.pid == holder["pid"] for p in psutil.Process().parents())
    except Exception:
        return False


def _in_use(root: Path, holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started") or 0)))
    who = f"`orpo-tune {holder.get('verb', '?')}` (pid {holder.get('pid')} on {holder.get('host', '?')}, since {since})"
    if holder.get("host") != socket.gethostname():
        return (
            f"{root}: in use by {who}; wait for it to finish, or, if nothing runs there any more, delete "
            f"{lock_path(root)}"
        )
    return f"{root}: in use by {who}; wait for it to finish or stop it, then run this again"


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """An flock on the directory, so that checking and taking the lock are one step; where the file system or
    the platform has no flock, the lock file alone (a race of two processes in the same millisecond remains)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock
