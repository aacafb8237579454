"""Safe output: atomic file writes that honour the umask, a per-directory lock, a writability check.

A crash (or a full disk) never leaves a half-written file: data go to a temporary file in the same
directory, are flushed and fsynced, and replace the target with :func:`os.replace`; on any error
the temporary file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

LOCK_NAME = ".rdsim.lock"

_umask_guard = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_guard:  # set a restrictive mask for an instant (never a permissive one)
        old = os.umask(0o077)
        os.umask(old)
    return old


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with mode ``0o666 & ~umask`` (like ``open(path, "wb")``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        except (AttributeError, OSError):  # pragma: no cover - no fchmod (Windows)
            pass
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_csv(path, rows: list[dict]) -> None:
    """Write a list of dicts as CSV (columns in first-seen order), atomically."""
    import io

    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def atomic_savefig(fig, path, **kwargs) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


# --- the output directory -------------------------------------------------------------------------

class OutputDirError(OSError):
    """The output directory cannot be created or written to (raised before any work starts)."""

    def __str__(self) -> str:
        return str(self.strerror)


class OutputLockedError(RuntimeError):
    """Another process holds the lock of the output directory."""


def ensure_writable_dir(path, what: str = "--out") -> Path:
    """Create ``path`` if missing and check that files can be created in it (a real probe file).

    Raises:
        OutputDirError: naming ``what`` and the path, with the system's reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(errno.ENOTDIR, f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".rdsim-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(err.errno, f"{what} {path}: not writable ({err.strerror or err}); "
                             "choose a directory you can write to (nothing was run)") from None
    return path


def _proc_start(pid: int):
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover
        return True
    return True


class DirLock:
    """An exclusive lock on an output directory: the file ``<dir>/.rdsim.lock`` (pid, host, start time).

    Created with ``O_CREAT | O_EXCL``; a lock left by a dead process on this host (its pid gone, or
    reused by a process that started later) is stale and taken over. A context manager; the lock
    file is removed on release (only if it is still ours).
    """

    def __init__(self, directory, command: str = "rdsim"):
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self.token = f"{os.getpid()}-{time.time_ns()}-{os.urandom(4).hex()}"
        self.held = False
        self.broke_stale: dict | None = None

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime(
            "%Y-%m-%d %H:%M:%S %z"), "command": self.command, "proc_start": _proc_start(os.getpid()),
            "token": self.token}

    def _read(self):
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        except OSError:
            return {}, ""
        try:
            info = json.loads(text)
        except ValueError:
            return {}, text
        return (info if isinstance(info, dict) else {}), text

    def _stale(self, info: dict) -> bool:
        if not info:  # empty or garbled: being written right now, or left by a crash long ago
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return False
        if info.get("host") != socket.gethostname():
            return False  # another machine: cannot tell
        pid = info.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True
        if pid == os.getpid() and info.get("token") != self.token:
            return False
        if not _pid_alive(pid):
            return True
        start = info.get("proc_start")
        now = _proc_start(pid)
        return start is not None and now is not None and now != start  # pid reused

    def acquire(self) -> "DirLock":
        data = (json.dumps(self._info(), indent=1) + "\n").encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                info, text = self._read()
                if info is None:
                    continue  # released meanwhile: try again
                if not self._stale(info):
                    raise OutputLockedError(self._held_message(info)) from None
                # take the stale lock over: move it aside, check it is the one judged stale
                aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.token}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    if aside.read_text() != text:  # a live lock slipped in: put it back
                        try:
                            os.link(aside, self.path)
                        except OSError:
                            pass
                        raise OutputLockedError(self._held_message(self._read()[0] or {}))
                finally:
                    try:
                        aside.unlink()
                    except OSError:
                        pass
                self.broke_stale = info
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return self
        raise OutputLockedError(f"{self.path}: could not take the lock (it keeps changing); "
                                "another rdsim process is starting in this directory")

    def _held_message(self, info: dict) -> str:
        if not info:
            who = "another process (the lock file is being written or is unreadable)"
        else:
            who = (f"process {info.get('pid')} on host {info.get('host')} "
                   f"({info.get('command', 'rdsim')}, started {info.get('started')})")
        return (f"{self.path.parent}: in use by {who}; two runs writing into one directory would "
                f"corrupt it. Wait for it to finish, use another --out, or, if that process is gone, "
                f"delete {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info, _ = self._read()
        if info and info.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
