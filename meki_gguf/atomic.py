"""Output files that appear complete or not at all, for every writer of the package (the
converter, llama-quantize's output, export-hf's folder): written under a temp name next to the
destination, then renamed onto it.

Written here rather than taken from a library because of what a killed run leaves: the temp file
of a process killed by SIGKILL (or a power loss) must be told apart from the one a concurrent
run is still writing. Each writer holds an flock on its temp file, which the kernel drops with the
process; the next run removes the temp files whose lock it can take.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import MekiError


def temp_name(out: Path) -> Path:
    """A fresh temp name for `out`, in its folder (one file system: os.replace is atomic)."""
    return out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"


def replace_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) a temp file in out's folder, then os.replace it onto `out`; on any error or
    Ctrl-C the temp file is removed, and a previous `out` is left as it was. A full disk or a
    read-only folder is a MekiError. Temp files of killed runs (SIGKILL, power loss) are removed
    first: the writer holds a lock on its temp file, which dies with the process.

    The rename is the commit point: a Ctrl-C before it is a KeyboardInterrupt, even one that C code
    turned into another error or dropped (_CtrlC); one from it on is ignored, `out` is complete."""
    remove_stale(out)
    tmp = temp_name(out)
    fd = None
    ctrl_c = _CtrlC()
    try:
        ctrl_c.install()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with contextlib.suppress(OSError):       # a file system without locks: then no run removes it
            fcntl.flock(fd, fcntl.LOCK_EX)
        write(tmp)
        ctrl_c.commit()
        os.replace(tmp, out)
    except BaseException as e:
        ctrl_c.quiet = True                      # a second Ctrl-C does not cut the clean-up short
        code = e.errno if isinstance(e, OSError) else None
        if fd is not None:                       # else tmp was never created (and may be another's)
            if isinstance(e, OSError) and code is None:
                code = _short_write_errno(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
        if ctrl_c.seen:                          # whatever the error became on its way out
            raise KeyboardInterrupt from None
        if code is not None and (msg := _write_error(code, e, out, tmp)):
            raise MekiError(msg) from None
        raise
    finally:
        if fd is not None:
            os.close(fd)
        ctrl_c.restore()


class _CtrlC:
    """SIGINT during replace_atomically. Python's handler raises KeyboardInterrupt in whatever Python
    code runs next, and that can be a callback of C code that does not pass it on: torch's tensor
    constructor (safetensors' get_tensor -> torch.asarray -> UntypedStorage.__getitem__) makes it a
    ValueError, numpy's tofile (its isinstance(file, os.PathLike)) a TypeError. This handler raises
    it too, and notes it: a noted Ctrl-C is what replace_atomically raises, and it stops the rename.
    Quiet (noted only) from the rename on and during the clean-up. Installed in the main thread over
    Python's own handler only: where SIGINT is ignored (a background job's) or handled, it stays so."""

    def __init__(self):
        self.seen = self.quiet = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.seen = True
        if not self.quiet:
            raise KeyboardInterrupt

    def commit(self) -> None:
        """The rename is next: quiet from here on; a Ctrl-C noted before (and lost on its way) is raised."""
        self.quiet = True
        if self.seen:
            raise KeyboardInterrupt

    def restore(self) -> None:
        self.quiet = True                        # signal.signal runs a pending handler first
        if signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def remove_stale(out: Path) -> None:
    """Remove the temp files (or folders) of `out` that no live writer holds the lock of."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.{'[0-9a-f]' * 8}.tmp"):   # replace_atomically's names
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:                          # a running conversion's (BlockingIOError), or not ours to remove
            pass
        finally:
            os.close(fd)


def _short_write_errno(fd: int) -> int | None:
    """The errno of a short write that was reported without one: numpy's tofile (the tensors'
    writes) raises a bare OSError("N requested and M written") on a full disk. ENOSPC if the
    temp file's file system has no block left for us."""
    st = os.fstatvfs(fd)
    return errno.ENOSPC if st.f_bavail * st.f_frsize < st.f_bsize else None


def _write_error(code: int, e: OSError, out: Path, tmp: Path) -> str | None:
    """One line for the OSErrors (errno `code`) that are about the output's file system; None
    for others, such as a checkpoint read failing mid-write."""
    folder = os.path.abspath(out.parent)
    what = {errno.ENOSPC: f"the disk holding {folder} is full",
            errno.EDQUOT: f"the disk quota for {folder} is exceeded",
            errno.EFBIG: "the file is too large for its file system",
            errno.EROFS: f"{folder} is on a read-only file system"}.get(code)
    if what is None and code in (errno.EACCES, errno.EPERM) and str(e.filename) == str(tmp):
        what = f"no permission to replace {out}" if e.filename2 else f"no permission to write in {folder}"
    if what is None:
        return None
    return f"cannot write {out}: {what} ({errno.errorcode[code]}: {os.strerror(code)}); nothing was written"


@contextlib.contextmanager
def temp_folder(out_dir: Path) -> Iterator[Path]:
    """A new temp folder next to `out_dir`, locked as replace_atomically's temp files are, to be
    written whole and renamed onto out_dir by the caller (export-hf), who also removes it on
    failure. Temp folders of out_dir that no writer holds (a SIGKILLed export's) are removed first."""
    out_dir = Path(out_dir)
    remove_stale(out_dir)
    tmp = temp_name(out_dir)
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):         # a file system without locks: then no run removes it
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)
