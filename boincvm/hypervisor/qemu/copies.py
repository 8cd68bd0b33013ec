"""Copying files between the host and a QEMU guest: the agent path, and the choice of path.

qemu-guest-agent moves a file in 4 MiB ``guest-file-read``/``guest-file-write`` chunks; a
file of the transfer disk's size or more goes through a hot-plugged disk instead
(:mod:`.xfer`) when the VM can take one. Copies out land in a temporary file renamed into
place, so a failed copy leaves nothing at the destination.
"""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

from boincvm.errors import GuestError, InputError, OutputError, OutputMissing
from boincvm.hypervisor.qemu.qga import CHUNK, GuestAgent, is_missing_file
from boincvm.hypervisor.qemu.xfer import TransferDisk


def copy_in(agent: GuestAgent, transfer: TransferDisk, host_path: Path, guest_path: str) -> None:
    """Write a host file into the guest: a large one through ``transfer``, else through ``agent``.

    Raises:
        GuestError: the guest file cannot be created or written.
        InputError: the host file cannot be read.
        VmTimeout: the transfer disk did not appear, the copy stalled or the unplug hung.
    """
    try:
        st = host_path.stat()
    except OSError as exc:
        raise InputError(f"cannot read {host_path}: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode) and transfer.wanted(st.st_size):
        if transfer.push(host_path, guest_path, st.st_size):
            return
    try:
        f = host_path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {host_path}: {exc.strerror}") from exc
    with f:
        handle = agent.open(guest_path, "wb")
        try:
            while chunk := f.read(CHUNK):
                agent.write(handle, chunk)
        finally:
            agent.close_file(handle)


def copy_out(
    agent: GuestAgent, transfer: TransferDisk, guest_path: str, host_path: Path, max_bytes: int | None
) -> int:
    """Copy a guest file to ``host_path`` through a temporary file; its size.

    The size is checked in the guest first; a large file then goes through ``transfer``,
    a small one through ``agent``.

    Raises:
        OutputError: the file is missing, larger than ``max_bytes`` or changed size
            meanwhile (then nothing is written at ``host_path``).
        GuestError: reading it failed.
        VmTimeout: the transfer disk did not appear, the copy stalled or the unplug hung.
    """
    try:
        handle = agent.open(guest_path, "rb")
    except GuestError as exc:
        if is_missing_file(exc):
            raise OutputMissing(f"guest file {guest_path} does not exist") from exc
        raise
    tmp = host_path.with_name(f".{host_path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        try:
            size = agent.size(handle)
        finally:
            agent.close_file(handle)
        if max_bytes is not None and size > max_bytes:
            raise OutputError(f"guest file {guest_path} is {size} bytes, more than the {max_bytes} allowed")
        if transfer.wanted(size) and transfer.pull(guest_path, tmp, size):
            total = size
        else:
            tmp.unlink(missing_ok=True)
            total = _pull_by_agent(agent, guest_path, tmp, max_bytes)
        tmp.replace(host_path)
        return total
    finally:
        tmp.unlink(missing_ok=True)


def _pull_by_agent(agent: GuestAgent, guest_path: str, tmp: Path, max_bytes: int | None) -> int:
    handle = agent.open(guest_path, "rb")
    try:
        total = 0
        with tmp.open("wb") as f:
            while True:
                data, eof = agent.read(handle)
                total += len(data)
                if max_bytes is not None and total > max_bytes:  # it grew while we read
                    raise OutputError(f"guest file {guest_path} grew past the {max_bytes} bytes allowed")
                f.write(data)
                if eof or not data:
                    break
        return total
    finally:
        agent.close_file(handle)


def read_small(agent: GuestAgent, guest_path: str, max_bytes: int) -> bytes | None:
    """Up to ``max_bytes`` of a guest file, or None when it does not exist.

    Raises:
        GuestError: it exists but cannot be read.
    """
    try:
        handle = agent.open(guest_path, "rb")
    except GuestError as exc:
        if is_missing_file(exc):
            return None
        raise
    try:
        out = bytearray()
        while len(out) < max_bytes:
            data, eof = agent.read(handle, min(CHUNK, max_bytes - len(out)))
            out += data
            if eof or not data:
                break
        return bytes(out[:max_bytes])
    finally:
        agent.close_file(handle)
