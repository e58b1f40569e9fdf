"""Read members of zip archives by path, opening each archive once per process.

A ``zipfile.ZipFile`` must not be shared across ``fork``: parent and child would share
one file offset and interleave their seeks. The open handles are therefore cached per
process id; a forked DataLoader worker sees a foreign pid and reopens its archives.
"""

import os
import zipfile

_handles: dict[str, zipfile.ZipFile] = {}
_owner_pid: int | None = None


def open_zip(zip_path: str) -> zipfile.ZipFile:
    """The process-wide read-only handle of ``zip_path``, opened on first use."""
    global _owner_pid
    if _owner_pid != os.getpid():
        # Inherited through fork: drop (without closing) the parent's handles.
        _handles.clear()
        _owner_pid = os.getpid()
    key = os.path.abspath(zip_path)
    handle = _handles.get(key)
    if handle is None:
        handle = zipfile.ZipFile(key, "r")
        _handles[key] = handle
    return handle


def _member_name(member: str) -> str:
    return member.lstrip("/")


def read(zip_path: str, member: str) -> bytes:
    """The uncompressed bytes of ``member`` (a path inside the archive)."""
    return open_zip(zip_path).read(_member_name(member))


def member_size(zip_path: str, member: str) -> int:
    """Uncompressed size in bytes of ``member``, from the archive's directory."""
    return open_zip(zip_path).getinfo(_member_name(member)).file_size
