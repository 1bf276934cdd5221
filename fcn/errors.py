"""The one exception type for mistakes a user can fix (bad path, bad file, wrong setting).

Entry points catch it and print its message as a single line with a non-zero exit code, so a
user sees what to change instead of a traceback. :func:`disk_full_error` turns a full disk,
found anywhere in an exception's chain, into one; :func:`write_error` does the same for every
error of the operating system on a write (full disk, file-size limit, read-only file system,
permission denied, a directory in a file's place).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and the fix."""


def disk_full_error(
    exc: BaseException,
    *,
    path: str | Path | None = None,
    needed: int | None = None,
    note: str = "",
    fallback_dir: str | Path | None = None,
) -> UserError | None:
    """A one-line :class:`UserError` when ``exc`` or an exception in its chain (``__cause__`` /
    ``__context__``) is a full disk or an exceeded quota, else None.

    Found as an :class:`OSError` with errno ENOSPC / EDQUOT, or as the text of those errors in a
    message (torch's zip writer reports a failed write as ``RuntimeError: [enforce fail at
    inline_container.cc ...]``). The message names the directory (of ``path``, else of the
    failing file when the error names it, else the current directory), the bytes ``needed`` when
    given, the bytes free there (``shutil.disk_usage``) and the fix; ``note`` is added (e.g.
    what was left intact).
    """
    seen: set[int] = set()
    reason, filename = None, None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            reason, filename = _FULL[exc.errno], filename or exc.filename
        elif reason is None:
            reason = next((text for text in _FULL.values() if text in str(exc)), None)
        exc = exc.__cause__ or exc.__context__
    if reason is None:
        return None
    target = Path(path) if path is not None else Path(filename) if isinstance(filename, (str, Path)) else None
    # the folder written to: of the file, else the caller's guess (the run directory), else here
    folder = target.parent if target is not None else Path(fallback_dir) if fallback_dir is not None else Path.cwd()
    parts = [f"{_size(needed)} needed"] if needed else []
    free = _free_bytes(folder)
    if free is not None:
        parts.append(f"{_size(free)} free")
    what = f"writing {target}" if target is not None else "writing the run's files"
    space = f" ({', '.join(parts)})" if parts else ""
    extra = f"; {note}" if note else ""
    return UserError(
        f"disk full while {what}: {reason} on {folder.resolve()}{space}{extra}; free space there (or write to "
        "another disk) and run again (training: add resume=auto to continue)"
    )


# What each write error means and what to do; errno, the text libraries quote it with (torch's zip
# writer reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc ...]``).
_WRITE = {
    errno.EFBIG: (
        "File too large",
        "the file-size limit of this shell or job (ulimit -f) was reached; raise it (ulimit -f unlimited) or "
        "ask the scheduler for a larger one",
    ),
    errno.EROFS: ("Read-only file system", "the file system is mounted read-only; write to a writable directory"),
    errno.EACCES: ("Permission denied", "fix the permissions of that directory or write to another one"),
    errno.EPERM: ("Operation not permitted", "fix the permissions of that directory or write to another one"),
    errno.EISDIR: ("Is a directory", "a directory is in the file's place; move or remove it"),
    errno.ENOTDIR: ("Not a directory", "a file is in the place of a directory on that path; move or remove it"),
}


def write_error(
    exc: BaseException,
    *,
    path: str | Path | None = None,
    note: str = "",
    fallback_dir: str | Path | None = None,
    needed: int | None = None,
) -> UserError | None:
    """A one-line :class:`UserError` for any error of the operating system on a write found in
    ``exc``'s chain: a full disk or quota (:func:`disk_full_error`), a file-size limit (EFBIG,
    ``ulimit -f``), a read-only file system, permission denied, or a directory where a file
    should be; else None. The message names the file (``path``, else the one the error names,
    else ``fallback_dir``), what happened, what to do, and ``note`` (what was left intact).
    """
    full = disk_full_error(exc, path=path, needed=needed, note=note, fallback_dir=fallback_dir)
    if full is not None:
        return full
    seen: set[int] = set()
    found, filename = None, None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE:
            found, filename = found or exc.errno, filename or exc.filename
        elif found is None:
            found = next((code for code, (text, _) in _WRITE.items() if text in str(exc)), None)
        exc = exc.__cause__ or exc.__context__
    if found is None:
        return None
    reason, fix = _WRITE[found]
    target = path if path is not None else filename if isinstance(filename, (str, Path)) else fallback_dir
    # neutral wording: EACCES and EISDIR also come from reads the checks before did not catch
    where = str(target) if target is not None else f"the run's files in {Path.cwd()}"
    extra = f"; {note}" if note else ""
    return UserError(f"{reason}: {where}; {fix}{extra}, then run again (training: add resume=auto)")


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.resolve().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    value, units = n / 1000, ["KB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"


def cause(exc: BaseException, limit: int = 300) -> str:
    """``"Class: first line"`` of the innermost exception ``exc`` was raised from, at most ``limit``
    characters: the part of a library error that says what is wrong, for a one-line message.

    Wrappers (torch.compile's ``BackendCompilerFailed``, DataLoader re-raises) put a headline such
    as "backend='inductor' raised:" first and the reason in the exception they chain from.
    """
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{exc.__class__.__name__}: {lines[0]}" if lines else exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
