"""One training run per output folder: an exclusive lock on OUT/.fastvae-train.lock for the run's life.

The lock is an flock(2) on the file, so the kernel drops it when the process ends, however it ends:
after a crash or a kill the next run takes the folder without anyone removing anything. The file
holds the owner's pid, which a refused run names. The owner removes the file when it is done; a run
that locked a file another owner removed meanwhile (checked by inode) locks the new one instead.
Under torchrun rank 0 holds the lock and every rank learns whether it got it, so they stop together.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".fastvae-train.lock"


class RunFolderBusy(UserError):
    """Another process is training into the same output folder; `pid` is its process id (0: unknown)."""

    def __init__(self, folder: Path, pid: int):
        owner = f"process {pid}" if pid > 0 else "another process"
        super().__init__(f"--out {folder} is in use: {owner} is training into it (lock {folder / LOCK_NAME}); "
                         "wait for it to finish, or choose another --out")
        self.pid = pid


def _lock(folder: Path) -> int:
    """An flock on folder's lock file (created if missing); its file descriptor, or RunFolderBusy."""
    import fcntl

    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise RunFolderBusy(folder, int(pid) if pid.isdigit() else 0) from None
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its owner removed the file after we opened it: lock the one at the path now


def acquire(folder) -> int:
    """Lock `folder` for this process and record its pid; returns the file descriptor that release() takes."""
    fd = _lock(Path(folder))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(folder, fd: int) -> None:
    """Remove the lock file, then drop the lock: in this order, a run waiting on the old file sees it gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(folder) / LOCK_NAME)
    os.close(fd)


def check_free(folder) -> None:
    """Raise RunFolderBusy now if a run holds `folder` (the launcher's early check; its rank 0 then locks it)."""
    if (Path(folder) / LOCK_NAME).exists():
        os.close(_lock(Path(folder)))  # the file stays: a starting run may have just opened it


@contextlib.contextmanager
def hold(folder, world):
    """Hold the lock on `folder` for the block: rank 0 takes it, and every rank of `world` learns whether
    it did (all raise RunFolderBusy if not), so that no rank trains alone or waits for a peer that stopped."""
    fd, busy = None, None
    if world.is_main:
        try:
            fd = acquire(folder)
        except RunFolderBusy as exc:
            busy = exc
    if world.size > 1:
        failed, pid = world.all_sum([float(busy is not None), float(busy.pid if busy else 0)])
        if failed and busy is None:
            busy = RunFolderBusy(Path(folder), int(pid))
    if busy is not None:
        raise busy
    try:
        yield
    finally:
        if fd is not None:
            release(folder, fd)
