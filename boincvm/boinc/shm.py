"""The shared-memory file ``boinc_mmap_file`` and the messages that travel through it.

The BOINC client and an app with ``api_version`` >= 6 talk through an 8192-byte file in
the slot directory, mapped by both. It holds eight message channels of 1024 bytes
(``SHARED_MEM`` in BOINC's ``lib/app_ipc.h``, in that order). In each channel the first
byte is the "full" flag and the rest a NUL-terminated text; a sender writes only into an
empty channel and the receiver clears the flag. Nothing ever blocks and nothing is
queued: a message that finds its channel full is simply not sent.

Messages are XML fragments without a root, read by substring search (``parse_double``
in BOINC's ``lib/parse.h``: find the tag, then ``strtod``). The builders here write
exactly what the 7.20.5 client and API write; the parsers read the way they read.
"""

from __future__ import annotations

import enum
import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from boincvm.boinc.errors import BoincApiError

#: Size of one channel (``MSG_CHANNEL_SIZE``).
MSG_CHANNEL_SIZE = 1024
#: The longest text a channel holds: the flag byte and the NUL take two bytes.
MAX_MESSAGE_BYTES = MSG_CHANNEL_SIZE - 2
#: Name of the memory-mapped file in the slot directory (``MMAPPED_FILE_NAME``).
MMAP_FILE_NAME = "boinc_mmap_file"


class Channel(enum.IntEnum):
    """The channels of ``SHARED_MEM``, in their order in the file (value = index)."""

    PROCESS_CONTROL_REQUEST = 0  # client -> app: <quit/> <suspend/> <resume/> <abort/> ...
    PROCESS_CONTROL_REPLY = 1  # app -> client: not used
    GRAPHICS_REQUEST = 2  # client -> app: not used
    GRAPHICS_REPLY = 3  # app -> client: <web_graphics_url>, <remote_desktop_addr>
    HEARTBEAT = 4  # client -> app: <heartbeat/><wss>..</wss><max_wss>..</max_wss>
    APP_STATUS = 5  # app -> client: CPU times, fraction done, ops
    TRICKLE_UP = 6  # app -> client: <have_new_trickle_up/>, <have_new_upload_file/>
    TRICKLE_DOWN = 7  # client -> app: <have_trickle_down/>, <upload_file_status/>

    @property
    def offset(self) -> int:
        """Byte offset of the channel in the file."""
        return int(self) * MSG_CHANNEL_SIZE


#: Size of the whole file (``sizeof(SHARED_MEM)``): 8192 bytes.
SHARED_MEM_SIZE = len(Channel) * MSG_CHANNEL_SIZE


class SharedMemoryError(BoincApiError):
    """The shared-memory file is missing, too small or cannot be mapped."""


class SharedMemory:
    """The mapped ``boinc_mmap_file``: send and receive on its channels.

    Use :meth:`create` on the client side and :meth:`attach` on the app side. Both ends
    may be in different processes; the mapping is ``MAP_SHARED``.
    """

    def __init__(self, mapping: mmap.mmap, path: Path) -> None:
        self._mm = mapping
        self.path = path

    @classmethod
    def create(cls, path: Path) -> SharedMemory:
        """Create (or reuse) the file at full size, map it and zero it, as the client does.

        Raises:
            SharedMemoryError: the file cannot be created or mapped.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise SharedMemoryError(f"cannot create {path}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size < SHARED_MEM_SIZE:
                os.ftruncate(fd, SHARED_MEM_SIZE)
            mapping = mmap.mmap(fd, SHARED_MEM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SharedMemoryError(f"cannot map {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        shm = cls(mapping, path)
        shm.reset()
        return shm

    @classmethod
    def attach(cls, path: Path) -> SharedMemory:
        """Map an existing file, as the app does (no resizing, no zeroing).

        Raises:
            SharedMemoryError: the file is missing, smaller than 8192 bytes or unmappable.
        """
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise SharedMemoryError(
                f"{path} does not exist",
                hint="the client creates it only for app versions with <api_version> 6.0 or more",
            ) from None
        except OSError as exc:
            raise SharedMemoryError(f"cannot open {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < SHARED_MEM_SIZE:
                raise SharedMemoryError(
                    f"{path} is {size} bytes; the BOINC shared memory is {SHARED_MEM_SIZE}"
                )
            mapping = mmap.mmap(fd, SHARED_MEM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SharedMemoryError(f"cannot map {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return cls(mapping, path)

    def has_message(self, channel: Channel) -> bool:
        """Whether the channel holds an unread message."""
        return self._mm[channel.offset] != 0

    def send(self, channel: Channel, message: str) -> bool:
        """Write a message if the channel is empty (``MSG_CHANNEL::send_msg``).

        The text goes in first and the flag byte last, so a reader never sees a flagged
        channel with a half-written text.

        Returns:
            False when the previous message is still unread (nothing is written).

        Raises:
            ValueError: the message is longer than 1022 bytes (BOINC would truncate it).
        """
        data = _encode(message)
        off = channel.offset
        if self._mm[off] != 0:
            return False
        self._mm[off + 1 : off + 1 + len(data)] = data
        self._mm[off] = 1
        return True

    def send_overwrite(self, channel: Channel, message: str) -> None:
        """Write a message whether or not the channel is empty (``send_msg_overwrite``).

        Raises:
            ValueError: the message is longer than 1022 bytes.
        """
        data = _encode(message)
        off = channel.offset
        self._mm[off + 1 : off + 1 + len(data)] = data
        self._mm[off] = 1

    def receive(self, channel: Channel) -> str | None:
        """Take the channel's message and clear its flag (``MSG_CHANNEL::get_msg``).

        Returns:
            The text, or None when the channel is empty.
        """
        off = channel.offset
        if self._mm[off] == 0:
            return None
        raw = self._mm[off + 1 : off + MSG_CHANNEL_SIZE - 1]
        end = raw.find(b"\0")
        text = (raw if end < 0 else raw[:end]).decode("utf-8", "replace")
        self._mm[off] = 0
        return text

    def reset(self) -> None:
        """Zero every channel (``APP_CLIENT_SHM::reset_msgs``, done before each start)."""
        self._mm[:SHARED_MEM_SIZE] = bytes(SHARED_MEM_SIZE)

    def close(self) -> None:
        """Unmap the file (it stays on disk)."""
        if not self._mm.closed:
            self._mm.close()

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(message: str) -> bytes:
    data = message.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a BOINC channel message holds at most {MAX_MESSAGE_BYTES} bytes, not {len(data)}")
    return data + b"\0"


# --------------------------------------------------------------------------------------
# Parsing helpers with BOINC's semantics (lib/parse.h: strstr, then strtod/strtol)

_FLOAT = re.compile(
    r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf(?:inity)?|nan))", re.IGNORECASE
)
_INT = re.compile(r"\s*([+-]?\d+)")


def parse_double(message: str, tag: str) -> float | None:
    """The number after ``tag`` in ``message``, or None (absent, unparsable, not finite)."""
    pos = message.find(tag)
    if pos < 0:
        return None
    m = _FLOAT.match(message, pos + len(tag))
    if m is None:
        return None
    value = float(m.group(1))
    return value if math.isfinite(value) else None


def parse_int(message: str, tag: str) -> int | None:
    """The integer after ``tag`` in ``message``, or None."""
    pos = message.find(tag)
    if pos < 0:
        return None
    m = _INT.match(message, pos + len(tag))
    return int(m.group(1)) if m else None


def _e(value: float) -> str:
    """C's ``%e``: six decimals, two-digit exponent (Python's ``e`` format is the same)."""
    return f"{value:e}"


def _f(value: float) -> str:
    """C's ``%f``."""
    return f"{value:f}"


# --------------------------------------------------------------------------------------
# process_control_request (client -> app)


class Control(enum.Flag):
    """Process-control requests; a parsed message may carry several of them."""

    NONE = 0
    SUSPEND = enum.auto()
    RESUME = enum.auto()
    QUIT = enum.auto()
    ABORT = enum.auto()
    REREAD_APP_INFO = enum.auto()
    NETWORK_AVAILABLE = enum.auto()  # 7.20.5 only; removed in later clients

    @property
    def tag(self) -> str:
        """The message text for a single request, e.g. ``<quit/>``.

        Raises:
            ValueError: this is not exactly one request.
        """
        try:
            return _CONTROL_TAGS[self]
        except KeyError:
            raise ValueError(f"{self!r} is not a single process-control request") from None


_CONTROL_TAGS: dict[Control, str] = {
    Control.SUSPEND: "<suspend/>",
    Control.RESUME: "<resume/>",
    Control.QUIT: "<quit/>",
    Control.ABORT: "<abort/>",
    Control.REREAD_APP_INFO: "<reread_app_info/>",
    Control.NETWORK_AVAILABLE: "<network_available/>",
}


def parse_control(message: str) -> Control:
    """The requests in a process-control message (the API tests each tag separately)."""
    found = Control.NONE
    for flag, tag in _CONTROL_TAGS.items():
        if tag in message:
            found |= flag
    return found


# --------------------------------------------------------------------------------------
# heartbeat (client -> app)


@dataclass(frozen=True)
class Heartbeat:
    """A heartbeat-channel message.

    Attributes:
        alive: the message contains ``<heartbeat/>`` (only that resets the give-up timer).
        wss: the task's working-set size in bytes, as the client measured it.
        max_wss: the RAM the client lets tasks use (``available_ram()``), bytes.
        network_suspended: the client's network activity is suspended.
        sporadic_ca: the "sporadic app" state (later clients only).
    """

    alive: bool = True
    wss: float | None = None
    max_wss: float | None = None
    network_suspended: bool = False
    sporadic_ca: int | None = None


def format_heartbeat(wss: float, max_wss: float, *, network_suspended: bool = False) -> str:
    """The 7.20.5 client's heartbeat: ``<heartbeat/><wss>%e</wss><max_wss>%e</max_wss>``."""
    text = f"<heartbeat/><wss>{_e(wss)}</wss><max_wss>{_e(max_wss)}</max_wss>"
    return text + ("<network_suspended/>" if network_suspended else "")


def parse_heartbeat(message: str) -> Heartbeat:
    """Read a heartbeat message.

    The 7.20.5 API looks for ``suspend_network`` and so never sees the flag the client
    sends; we accept ``<network_suspended/>`` (what clients send) and the old spelling.
    """
    return Heartbeat(
        alive="<heartbeat/>" in message,
        wss=parse_double(message, "<wss>"),
        max_wss=parse_double(message, "<max_wss>"),
        network_suspended="<network_suspended/>" in message or "<suspend_network/>" in message,
        sporadic_ca=parse_int(message, "<sporadic_ca>"),
    )


# --------------------------------------------------------------------------------------
# app_status (app -> client)


@dataclass(frozen=True)
class AppStatus:
    """An app-status message: what the app reports about itself every second.

    CPU times are cumulative over all runs of the task (the client's ``wu_cpu_time`` plus
    this run), in seconds. The client resets both CPU times to 0 before reading each
    message, so every message carries both.

    Attributes:
        current_cpu_time: CPU seconds so far.
        checkpoint_cpu_time: CPU seconds at the last checkpoint; a change tells the client
            the task checkpointed.
        fraction_done: 0..1, already mapped into ``fraction_done_start..end``; None when not
            reported yet (the client also ignores an exact 0).
        want_network: the app wants the client's network to be available.
        other_pid: one extra process the client accounts CPU to and kills with the task
            (a VM process, for a wrapper).
        bytes_sent: network bytes sent by the app in this run.
        bytes_received: network bytes received by the app in this run.
        fpops_per_cpu_sec: floating-point speed claimed for credit.
        fpops_cumulative: floating-point operations done so far, for credit.
        intops_per_cpu_sec: integer speed claimed for credit.
        intops_cumulative: integer operations done so far, for credit.
        wss: resident size reported by the app (parsed by later clients only).
    """

    current_cpu_time: float = 0.0
    checkpoint_cpu_time: float = 0.0
    fraction_done: float | None = None
    want_network: bool = False
    other_pid: int | None = None
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    fpops_per_cpu_sec: float | None = None
    fpops_cumulative: float | None = None
    intops_per_cpu_sec: float | None = None
    intops_cumulative: float | None = None
    wss: float | None = None


def format_app_status(status: AppStatus) -> str:
    """The message for ``status``, one ``<tag>value</tag>`` per line.

    Starts exactly as the API's ``boinc_report_app_status_aux`` (current and checkpoint
    CPU time, fraction done, other pid, bytes sent and received) and adds the optional
    tags the 7.20.5 client parses (``want_network``, ``fpops_*``, ``intops_*``) and
    ``wss`` (later clients). Non-finite or negative numbers are sent as 0 and the
    fraction done is clamped to 0..1.
    """
    lines = [
        f"<current_cpu_time>{_e(_clean(status.current_cpu_time))}</current_cpu_time>",
        f"<checkpoint_cpu_time>{_e(_clean(status.checkpoint_cpu_time))}</checkpoint_cpu_time>",
    ]
    if status.fraction_done is not None:
        fd = min(max(_clean(status.fraction_done), 0.0), 1.0)
        lines.append(f"<fraction_done>{_e(fd)}</fraction_done>")
    if status.other_pid:
        lines.append(f"<other_pid>{status.other_pid}</other_pid>")
    if status.bytes_sent:
        lines.append(f"<bytes_sent>{_f(_clean(status.bytes_sent))}</bytes_sent>")
    if status.bytes_received:
        lines.append(f"<bytes_received>{_f(_clean(status.bytes_received))}</bytes_received>")
    if status.want_network:
        lines.append("<want_network>1</want_network>")
    for tag, value in (
        ("fpops_per_cpu_sec", status.fpops_per_cpu_sec),
        ("fpops_cumulative", status.fpops_cumulative),
        ("intops_per_cpu_sec", status.intops_per_cpu_sec),
        ("intops_cumulative", status.intops_cumulative),
        ("wss", status.wss),
    ):
        if value is not None:
            lines.append(f"<{tag}>{_e(_clean(value))}</{tag}>")
    return "".join(line + "\n" for line in lines)


def parse_app_status(message: str) -> AppStatus:
    """Read an app-status message as the client does (``get_app_status_msg``).

    Missing CPU times are 0; a fraction done of exactly 0 counts as "not reported";
    negative CPU times become 0.
    """
    fd = parse_double(message, "<fraction_done>")
    want = parse_int(message, "<want_network>")
    return AppStatus(
        current_cpu_time=max(parse_double(message, "<current_cpu_time>") or 0.0, 0.0),
        checkpoint_cpu_time=max(parse_double(message, "<checkpoint_cpu_time>") or 0.0, 0.0),
        fraction_done=fd if fd else None,
        want_network=bool(want),
        other_pid=parse_int(message, "<other_pid>"),
        bytes_sent=parse_double(message, "<bytes_sent>") or 0.0,
        bytes_received=parse_double(message, "<bytes_received>") or 0.0,
        fpops_per_cpu_sec=parse_double(message, "<fpops_per_cpu_sec>"),
        fpops_cumulative=parse_double(message, "<fpops_cumulative>"),
        intops_per_cpu_sec=parse_double(message, "<intops_per_cpu_sec>"),
        intops_cumulative=parse_double(message, "<intops_cumulative>"),
        wss=parse_double(message, "<wss>"),
    )


def _clean(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


# --------------------------------------------------------------------------------------
# trickle and graphics channels (only what a wrapper may use)

HAVE_NEW_TRICKLE_UP = "<have_new_trickle_up/>\n"
HAVE_NEW_UPLOAD_FILE = "<have_new_upload_file/>\n"
HAVE_TRICKLE_DOWN = "<have_trickle_down/>\n"
UPLOAD_FILE_STATUS = "<upload_file_status/>\n"


def format_remote_desktop(address: str) -> str:
    """The graphics-reply message announcing a VM console (``host:port``), as vboxwrapper sends."""
    return f"<remote_desktop_addr>{address}</remote_desktop_addr>"


def format_web_graphics(url: str) -> str:
    """The graphics-reply message announcing a web page for the task."""
    return f"<web_graphics_url>{url}</web_graphics_url>"


# --------------------------------------------------------------------------------------
# The two ends


class AppChannels:
    """The app's end of the shared memory: typed send and receive."""

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm

    def send_status(self, status: AppStatus) -> bool:
        """Send a status message; False when the client has not read the previous one."""
        return self.shm.send(Channel.APP_STATUS, format_app_status(status))

    def status_pending(self) -> bool:
        """Whether the last status message is still unread by the client."""
        return self.shm.has_message(Channel.APP_STATUS)

    def receive_heartbeat(self) -> Heartbeat | None:
        """Take the pending heartbeat message, if any."""
        text = self.shm.receive(Channel.HEARTBEAT)
        return None if text is None else parse_heartbeat(text)

    def receive_control(self) -> Control:
        """Take the pending process-control message; ``Control.NONE`` when there is none."""
        text = self.shm.receive(Channel.PROCESS_CONTROL_REQUEST)
        return Control.NONE if text is None else parse_control(text)

    def send_trickle_up(self, *, trickle: bool = True, upload: bool = False) -> bool:
        """Announce a new ``trickle_up.xml`` and/or an intermediate upload request."""
        text = (HAVE_NEW_TRICKLE_UP if trickle else "") + (HAVE_NEW_UPLOAD_FILE if upload else "")
        return self.shm.send(Channel.TRICKLE_UP, text)

    def receive_trickle_down(self) -> str | None:
        """Take the pending trickle-down notice, if any."""
        return self.shm.receive(Channel.TRICKLE_DOWN)

    def send_graphics(self, message: str) -> bool:
        """Send a graphics-reply message (see :func:`format_remote_desktop`)."""
        return self.shm.send(Channel.GRAPHICS_REPLY, message)


class ClientChannels:
    """The client's end of the shared memory: typed send and receive."""

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm

    def send_heartbeat(self, wss: float, max_wss: float, *, network_suspended: bool = False) -> bool:
        """Send a heartbeat; False when the app has not read the previous one."""
        return self.shm.send(
            Channel.HEARTBEAT, format_heartbeat(wss, max_wss, network_suspended=network_suspended)
        )

    def send_control(self, request: Control) -> bool:
        """Send one process-control request; False when the previous one is unread.

        Raises:
            ValueError: ``request`` is not a single request.
        """
        return self.shm.send(Channel.PROCESS_CONTROL_REQUEST, request.tag)

    def control_pending(self) -> bool:
        """Whether the last process-control request is still unread by the app."""
        return self.shm.has_message(Channel.PROCESS_CONTROL_REQUEST)

    def receive_status(self) -> AppStatus | None:
        """Take the pending status message, if any."""
        text = self.shm.receive(Channel.APP_STATUS)
        return None if text is None else parse_app_status(text)

    def receive_trickle_up(self) -> str | None:
        """Take the pending trickle-up notice, if any."""
        return self.shm.receive(Channel.TRICKLE_UP)

    def receive_graphics(self) -> str | None:
        """Take the pending graphics-reply message, if any."""
        return self.shm.receive(Channel.GRAPHICS_REPLY)
