"""Test shim (on PYTHONPATH): the disk fills up while the FULL_DISK_AT-th checkpoint
temporary file (``*.pth.tmp.<pid>``) of the process is written; writes to it then fail
with ENOSPC, as on a full filesystem."""

import builtins
import errno
import fnmatch
import os

_open = builtins.open
_opened = 0


class _FillingFile:
    def __init__(self, file, room):
        self._file, self._room = file, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _open_filling(file, mode="r", *args, **kwargs):
    global _opened
    f = _open(file, mode, *args, **kwargs)
    if "w" in mode and fnmatch.fnmatch(os.path.basename(str(file)), "*.pth.tmp.*"):
        _opened += 1
        if _opened == int(os.environ["FULL_DISK_AT"]):
            return _FillingFile(f, room=4096)
    return f


builtins.open = _open_filling
