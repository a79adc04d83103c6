"""Writing files so that nothing is lost or half-written; file digests; plain data for JSON; the git revision.

Every file fer_lib writes (checkpoints, weights, results, ONNX models, the data cache) goes
through `atomic_path`: the writer fills a temporary file in the target's folder, which is then
renamed over the target (`os.replace`, atomic on one file system). So a reader, or a crash
halfway, sees the old file or the new one, never half of either.

Three details make that hold in practice:
- temporary files are named `.<target name>.<pid>.tmp`, so the next write of the same target
  can recognise and delete one left behind by a killed writer (its process is gone);
- an OS error (disk full, permission denied, read-only file system) comes out as one
  `WriteError` naming the target file and the cause, with the temporary file removed;
- files get the permissions any new file gets (0666 minus the umask), not the 0600 that
  `tempfile.mkstemp` would give, so a shared cache or a shipped weights file is readable.

Names that come from users or data (run names, table and figure names, photo stems) become
file names through `safe_filename` only: one path component, no "..", bounded length.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["WriteError", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "safe_filename", "sha256_file", "to_jsonable", "git_revision", "git_dirty"]

# Longest name safe_filename returns, in UTF-8 bytes: file systems allow 255 bytes per name, and
# callers append suffixes such as "_annotated.png" or ".csv".
MAX_FILENAME_BYTES = 120
_WINDOWS_DEVICE_NAMES = frozenset(["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                                   *(f"LPT{i}" for i in range(1, 10))])


class WriteError(OSError):
    """A file could not be written; the message names the file and the cause (errno is kept)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror or super().__str__()


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete `.<name>.<pid>.tmp[<suffix>]` files next to `target` whose writer has exited."""
    prefix = f".{target.name}."
    try:
        candidates = list(target.parent.glob(f"{glob_escape(prefix)}*.tmp*"))
    except OSError:
        return
    for tmp in candidates:
        pid_text, _, rest = tmp.name[len(prefix):].partition(".tmp")
        if rest not in ("", target.suffix):
            continue
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def glob_escape(text: str) -> str:
    """`text` with glob wildcards escaped, for use inside a `Path.glob` pattern."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _describe(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        cause = "no space left on the device"
    elif error.errno in (errno.EACCES, errno.EPERM):
        cause = "permission denied"
    elif error.errno == errno.EROFS:
        cause = "read-only file system"
    else:
        cause = error.strerror or str(error)
    return f"cannot write {path}: {cause}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the old
    `path`, if any, is untouched. OS errors become one `WriteError` naming `path`.
    keep_suffix: the temporary ends in the target's suffix too (`.clip.avi.<pid>.tmp.avi`),
    for writers that choose the format from the file name, such as OpenCV's VideoWriter.

        with atomic_path("model.onnx") as tmp:
            onnx.save(model, str(tmp))
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(exc.errno, _describe(exc, target.parent)) from exc
    _remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix if keep_suffix else ''}")
    try:
        yield tmp
        if not tmp.exists():
            raise WriteError(errno.ENOENT, f"cannot write {target}: the writer produced no file")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except WriteError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(exc.errno, _describe(exc, target)) from exc
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        # Writers in C++ (torch.save's zip writer) report a full disk as their own error, e.g.
        # RuntimeError "unexpected pos ...", with the OSError only in the exception chain.
        cause = _os_error_in_chain(exc)
        if cause is None:
            raise
        raise WriteError(cause.errno, _describe(cause, target)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_error_in_chain(error: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def safe_filename(name: str) -> str:
    """`name` made safe to use as ONE file or folder name on Linux, macOS and Windows.

    The one place where names that come from users or data (run names, figure and table names,
    photo stems) become path components. Letters and digits of any script, "-", "_" and "."
    are kept; every other character (path separators, spaces, control characters, the
    Windows-reserved `<>:"|?*`) becomes "-"; runs of dots collapse to one (so no ".."), and
    leading or trailing dots, dashes and spaces go (no hidden files, no names Windows cannot
    open). Windows device names (CON, NUL, COM1...) get a "_". A name longer than
    MAX_FILENAME_BYTES (UTF-8) is cut and ends in 8 hex digits of its hash, so two long names
    stay distinct. Never empty ("unnamed"); applying it twice changes nothing.
    """
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(name))
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", cleaned)).strip(".- ")
    stem, dot, rest = cleaned.partition(".")
    if stem.upper() in _WINDOWS_DEVICE_NAMES:
        cleaned = f"{stem}_{dot}{rest}"
    if len(cleaned.encode("utf-8")) > MAX_FILENAME_BYTES:
        digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        head = cleaned.encode("utf-8")[:MAX_FILENAME_BYTES - 9].decode("utf-8", "ignore")
        cleaned = f"{head.rstrip('.- ')}-{digest}"
    return cleaned or "unnamed"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks (checkpoints need not fit twice in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_and_sync(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must not reach the disk before the data


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring); return the path."""
    with atomic_path(path) as tmp:
        _write_and_sync(tmp, data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """Write `value` as JSON atomically; NaN/inf become null so every reader can parse it."""
    text = json.dumps(to_jsonable(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def to_jsonable(value: Any, *, strict: bool = False, where: str = "value") -> Any:
    """`value` as JSON data: dicts (str keys), lists, str, int, float, bool, None.

    numpy and torch scalars become Python numbers, arrays and tensors lists, paths strings,
    tuples lists, dataclass instances dicts; NaN and infinities become None (JSON has no such
    numbers, and `json.dumps` would write invalid JSON for them). Any other object becomes
    `str(obj)`, or with `strict=True` a TypeError that names where it sits (`where`, e.g.
    "metrics.accuracy").
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), strict=strict, where=where)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, strict=strict, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, strict=strict, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy array or torch tensor
        return to_jsonable(value.tolist())  # a 0-d one gives a plain number
    if strict:
        raise TypeError(f"{where}: {type(value).__name__} is not JSON serialisable; "
                        "pass numbers, strings, lists or dicts")
    return str(value)


def _git(*args: str) -> subprocess.CompletedProcess | None:
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def checkout_root() -> Path | None:
    """The repository folder when fer_lib runs from a checkout (editable install or PYTHONPATH),
    None when it was installed as a package (site-packages, e.g. in Colab)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root
    return None


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """`git rev-parse HEAD` of the checkout fer_lib is imported from, or None.

    An installed (non-editable) package is not in a git checkout and git may be missing:
    both are normal, so every failure just means "unknown".
    """
    out = _git("rev-parse", "HEAD")
    rev = out.stdout.strip() if out is not None and out.returncode == 0 else ""
    return rev or None


def git_dirty() -> bool | None:
    """Whether tracked files of that checkout differ from HEAD; None when unknown."""
    if git_revision() is None:
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is None or out.returncode != 0:
        return None
    return bool(out.stdout.strip())
