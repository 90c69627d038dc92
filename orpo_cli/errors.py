"""What can go wrong, sorted by whose it is, and the one place that sorts an exception into its class.

* `UserError`: a mistake the user can fix (the recipe, a path, the data, the machine): one line, exit 2.
* `RunFailed`: a run that started but cannot go on (the loss diverged): one line, exit 1.
* `Interrupted`: stopped on SIGINT/SIGTERM after a checkpoint: exit 130.
* `InternalError`: ours, a bug: one line naming the stage that failed and the file holding the
  traceback, exit 1 (`--debug` or ORPO_TUNE_DEBUG=1 prints the traceback).

Libraries raise on bad input with their own exception types (PEFT's ValueError for a target module the
model lacks, transformers' ImportError for an attention kernel that is not installed, the OS's
NotADirectoryError for an output path under a file). `stage(...)` goes around code that hands the
user's input to a library and turns what escapes it into one of the classes above: see `stage`.
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import time
import traceback
from pathlib import Path
from types import TracebackType

from orpo_cli.storage import cache_root


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


class QuietExit(Exception):
    """Exit with `code` and print nothing: the message was printed elsewhere (by a worker, or by rank 0)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class InternalError(Exception):
    """An exception nobody expected (a bug of ours, not the user's input), and the stage it escaped from."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {one_line(cause)}")
        self.stage = stage
        self.cause = cause


DEBUG_ENV = "ORPO_TUNE_DEBUG"
_RUN_LOG_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("orpo_run_log_dir", default=None)


class stage:  # noqa: N801 - used as `with stage(...)` and `@stage(...)`, like contextlib's helpers
    """Mark what the program is doing and sort whatever escapes it. Usable as a context or a decorator.

    `blame` names the recipe key or argument whose value this code hands to a library (`adapter`,
    `model.name_or_path`, `output_dir`). What escapes becomes:

    * our own classes (UserError, RunFailed, Interrupted, an InternalError from an inner stage), signals,
      exits and out-of-memory errors: unchanged (the command layer has an answer for each);
    * an OSError of the file system (full disk, permission denied, a file where a directory must be, a
      read-only disk): a UserError naming the path, whether or not `blame` is set;
    * with `blame`, any other exception raised inside a library is that library refusing the user's
      value: a UserError "`blame`: LIBRARY refused it: <its message>" (one raised by our own code is not);
    * anything else: an InternalError naming this stage.
    """

    def __init__(self, name: str, blame: str | None = None):
        self.name = name
        self.blame = blame

    def __enter__(self) -> stage:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> bool:
        if err is None or not isinstance(err, Exception) or passes_through(err):
            return False
        message = explain(err, self.blame, self.name)
        if message is not None:
            raise UserError(message) from err
        raise InternalError(self.name, err) from err

    def __call__(self, fn):  # type: ignore[no-untyped-def]
        """As a decorator; a `blame` like "{adapter_dir}" is filled in from the call's arguments."""
        import functools
        import inspect

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
            blame = self.blame
            if blame is not None and "{" in blame:
                blame = blame.format(**signature.bind(*args, **kwargs).arguments)
            with stage(self.name, blame):
                return fn(*args, **kwargs)

        return guarded


def passes_through(err: BaseException) -> bool:
    """Exceptions a stage never rewrites: ours (each already says what it is), the CLI framework's, OOM."""
    if isinstance(err, UserError | RunFailed | Interrupted | InternalError):
        return True
    module = type(err).__module__ or ""
    if module.split(".")[0] in {"orpo_cli", "click", "typer"}:  # e.g. QuietExit, typer.Exit
        return True
    return out_of_memory(err)


def framework_exit(err: BaseException) -> bool:
    """typer.Exit, click's usage errors: the CLI framework's own way out, never rewritten."""
    return (type(err).__module__ or "").split(".")[0] in {"click", "typer"}


def out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), a host MemoryError, or another backend's 'out of memory' RuntimeError."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------- what the user can fix
_FS_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
    errno.EMFILE: "too many open files",
}
_FS_FIX = {
    errno.ENOSPC: "free some space (old runs, checkpoints, caches) or write somewhere with room",
    errno.EDQUOT: "free some space or write somewhere with room",
    errno.EACCES: "make it writable (or readable) for this user, or choose another path",
    errno.EPERM: "choose another path",
    errno.EROFS: "choose a path on a writable disk",
    errno.ENOTDIR: "choose a path whose parents are directories",
    errno.EISDIR: "give a file, not a directory",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "write somewhere that allows larger files",
    errno.EMFILE: "raise the limit (ulimit -n)",
}
# Libraries written in Rust or C++ (safetensors, tokenizers, torch's zip writer) report an OS error as text.
_FS_TEXT = [
    (re.compile(r"no space left on device|os error 28", re.I), errno.ENOSPC),
    (re.compile(r"disk quota exceeded|os error 122", re.I), errno.EDQUOT),
    (re.compile(r"read-only file system|os error 30", re.I), errno.EROFS),
    (re.compile(r"permission denied|os error 13", re.I), errno.EACCES),
]


def explain(err: BaseException, blame: str | None = None, doing: str | None = None) -> str | None:
    """The one line a user reads for `err`, or None when it is not the user's to fix (then: a bug).

    `doing` (the stage) is said when the error names no path, e.g. a full disk while writing a checkpoint.
    """
    fs = _file_system(err, doing)
    if fs is not None:
        return f"{blame}: {fs}" if blame else fs
    if blame is not None and isinstance(err, ModuleNotFoundError) and err.name:
        package = err.name.split(".")[0]
        return f"{blame}: needs the Python package {package}, which is not installed (pip install {package})"
    library = library_of(err)
    if blame is not None and library is not None:
        return f"{blame}: {library} refused it: {one_line(err)}"
    return None


def _file_system(err: BaseException, doing: str | None = None) -> str | None:
    code = err.errno if isinstance(err, OSError) and err.errno in _FS_ERRNOS else None
    if code is None and not isinstance(err, OSError):
        text = str(err)
        code = next((c for pattern, c in _FS_TEXT if pattern.search(text)), None)
    if code is None:
        return None
    path = getattr(err, "filename", None)
    if path is not None:
        path = _target_of(Path(os.fsdecode(path)))
        if code == errno.EEXIST and path.exists() and not path.is_dir():
            code = errno.ENOTDIR  # mkdir over a file: say so, not "already exists"
    what = _FS_ERRNOS[code]
    cache = " (orpo-tune's cache: set ORPO_TUNE_CACHE to put it elsewhere)" if _in_cache(path) else ""
    if code == errno.ENOTDIR and path is not None:
        blocker = _file_in_the_way(path)
        if blocker == path:
            return f"{blocker} is a file, not a directory{cache}; give a directory"
        if blocker is not None:
            return f"{path}: {blocker} is a file, not a directory{cache}; {_FS_FIX[code]}"
    where = f"{path}: " if path is not None else ""
    when = f" while {doing}" if doing is not None and path is None else ""
    return f"{where}{what}{when}{cache}; {_FS_FIX[code]}"


def _in_cache(path: Path | None) -> bool:
    if path is None:
        return False
    root = cache_root().absolute()
    return path.absolute() == root or root in path.absolute().parents


# `.NAME.tmp...` and `.NAME.tmp-PID`: the temporary siblings atomic writes go through (atomic.py)
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.tmp-\d+|\.tmp(?:\.\w+)?|\.old-\d+)$")


def _target_of(path: Path) -> Path:
    """The file the user asked for, rather than the temporary sibling it was being written through."""
    match = _TEMPORARY.match(path.name)
    return path.with_name(match["name"]) if match else path


def _file_in_the_way(path: Path) -> Path | None:
    """The first part of `path` that exists and is not a directory."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return None


def library_of(err: BaseException) -> str | None:
    """The package that raised `err` (peft, transformers, ...): its traceback's deepest frame; None when
    that frame is ours (then the error is our code's, whatever input it was working on)."""
    tb, module = err.__traceback__, ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "") or ""
        tb = tb.tb_next
    top = module.split(".")[0]
    if not top or top in {"orpo_cli", "__main__"}:
        return None
    return top


def one_line(err: BaseException) -> str:
    """`Type: message`, the message's lines joined and cut to a readable length."""
    text = " ".join(str(err).split())
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------ our bugs
def use_run_log(directory: Path | None) -> None:
    """From now on, a traceback of ours goes to `directory`/error.log (the run directory, once it exists)."""
    _RUN_LOG_DIR.set(Path(directory) if directory is not None else None)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in {"", "0", "false", "no"}


def write_traceback(err: BaseException, command: str) -> Path | None:
    """Write `err`'s full traceback where the user can find it: the run directory's error.log when a run
    directory exists, else a file under the cache's logs/ (or the temporary directory). Returns the file."""
    text = "".join(traceback.format_exception(err))
    header = f"orpo-tune {command}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, pid {os.getpid()}\n"
    candidates = []
    run_dir = _RUN_LOG_DIR.get()
    if run_dir is not None and run_dir.is_dir():
        candidates.append(run_dir / "error.log")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"error-{command}-{stamp}-{os.getpid()}.log"
    candidates.append(cache_root() / "logs" / name)
    import tempfile

    candidates.append(Path(tempfile.gettempdir()) / name)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(header + text + "\n")
            return path
        except OSError:
            continue
    return None


# ------------------------------------------------------------------------------------ the command layer
def report(err: Exception, command: str) -> tuple[int, list[str]]:
    """What the CLI prints for an exception that reached it, and its exit code.

    2: the user's to fix (UserError, and file-system errors wherever they happen); 1: the run failed, ran
    out of memory, or hit a bug of ours; 130: interrupted. A bug's traceback is written to a file the line
    names, and printed too under --debug / ORPO_TUNE_DEBUG=1.
    """
    import sys

    debug = debug_enabled()
    if isinstance(err, QuietExit):  # a worker (or rank 0) already said why
        return err.code, []
    if isinstance(err, Interrupted):
        return 130, [str(err)]
    if isinstance(err, RunFailed):
        return 1, [f"error: {err}"]
    if out_of_memory(err):
        return 1, [f"error: {_out_of_memory_advice(err)}"]
    message = str(err) if isinstance(err, UserError) else explain(err)
    if message is not None:
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        return 2, [f"error: {line}" for line in message.splitlines() or ["error"]]
    where = err.stage if isinstance(err, InternalError) else f"`orpo-tune {command}`"
    cause = err.cause if isinstance(err, InternalError) else err
    log = write_traceback(err, command)
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    kept = f"the full traceback is in {log}" if log is not None else "the traceback could not be written"
    return 1, [
        f"error: internal error while {where}: {one_line(cause)}. This is a bug in orpo-tune, not a problem "
        f"with your input; {kept} (rerun with --debug or {DEBUG_ENV}=1 to print it) - please report it"
    ]


def _out_of_memory_advice(err: BaseException) -> str:
    what = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (
        f"out of memory ({what[:160]}). Lower train.micro_batch_size (raise train.gradient_accumulation to keep "
        "the batch), set train.gradient_checkpointing: true, lower orpo.max_length, or load the base in 4 bits "
        "(quantization.mode: 4bit); docs/qlora-memory.md says what fits. Checkpoints already written are kept, "
        "and train.gradient_checkpointing may change on --resume"
    )
