"""A client for qemu-guest-agent over its virtio-serial channel, built on ``qemu.qmp``.

The agent speaks QMP without a greeting or negotiation. Its channel can hold stale
replies (after a restore, or after a request that timed out), so every (re)connect is
followed by ``guest-sync`` with a random id, as the agent's documentation asks. Calls are
synchronous for the backend and each is bounded by a timeout.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from boincvm.errors import GuestError, GuestToolsMissing, HypervisorError, VmTimeout
from boincvm.hypervisor.qemu.aio import LoopThread

log = logging.getLogger(__name__)

#: qemu-ga may answer with up to 48 MiB of data plus base64 overhead; the default
#: 10 MiB read buffer of qemu.qmp drops the connection on an 8 MiB read.
READBUFLEN = 64 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
CLIENT_NAME = "boincvm-qga"
# Replies to guest-syncs that timed out arrive later with ids nobody waits for; qemu.qmp
# logs each as a warning. They are expected here, so only errors of this client show.
logging.getLogger(f"qemu.qmp.protocol.{CLIENT_NAME}").setLevel(logging.ERROR)


def connect_unix(path: Path) -> socket.socket:
    """Connect to a UNIX socket, even one whose path is longer than ``sun_path`` allows.

    Raises:
        OSError: the socket is not there or refuses the connection.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) < 100:
            sock.connect(str(path))
        else:  # BOINC slot directories can be deep: go through the directory's fd
            dfd = os.open(path.parent, os.O_PATH)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{path.name}")
            finally:
                os.close(dfd)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ExecStatus:
    """What ``guest-exec-status`` said."""

    exited: bool
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool


class GuestAgent:
    """One connection to one guest's qemu-guest-agent."""

    def __init__(self, socket_path: Path, loop: LoopThread, *, call_timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.loop = loop
        self.call_timeout = call_timeout
        self._client: QMPClient | None = None

    # -- connection ----------------------------------------------------------
    async def _aconnect(self) -> None:
        client = QMPClient(CLIENT_NAME, readbuflen=READBUFLEN)
        client.await_greeting = False
        client.negotiate = False
        await client.connect(connect_unix(self.socket_path))
        self._client = client

    async def _adisconnect(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.disconnect()

    def close(self) -> None:
        """Drop the connection (idempotent, never raises)."""
        if self._client is not None:
            try:
                self.loop.run(self._adisconnect(), 5.0, "closing the guest agent connection")
            except (VmTimeout, QMPError, OSError, EOFError) as exc:
                log.debug("qga disconnect: %s", exc)
                self._client = None

    def wait(self, timeout: float, alive: Callable[[], None]) -> float:
        """Connect and ``guest-sync`` until the agent answers; return the seconds it took.

        ``alive`` is called between attempts and raises if the VM has died.

        Raises:
            GuestToolsMissing: no answer within ``timeout``.
        """
        start = time.monotonic()
        deadline = start + timeout
        # Requests sent before qemu-ga opens its port go unanswered, so retry often.
        attempt = 0.25
        while True:
            alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                if self._client is None:
                    self.loop.run(self._aconnect(), min(remaining, 5.0), "connecting to the guest agent")
                self._sync(min(attempt, max(remaining, 0.05)))
                return time.monotonic() - start
            except VmTimeout:
                attempt = min(attempt * 1.5, 1.0)
            except (QMPError, OSError, EOFError) as exc:
                log.debug("qga not ready: %s", exc)
                self.close()
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        raise GuestToolsMissing(
            f"guest tools did not answer within {timeout:g} s; "
            "is qemu-guest-agent installed and started in the image?",
            hint="the image must run qemu-ga on the virtio-serial port org.qemu.guest_agent.0",
        )

    def _sync(self, timeout: float) -> None:
        token = random.randint(1, 2**31 - 1)
        got = self.loop.run(self._aexecute("guest-sync", {"id": token}), timeout, "guest-sync")
        if got != token:
            raise VmTimeout(f"guest-sync answered {got!r}, expected {token}")

    # -- calls ---------------------------------------------------------------
    async def _aexecute(self, cmd: str, args: Mapping[str, object] | None) -> object:
        if self._client is None:
            raise HypervisorError("the guest agent is not connected")
        return await self._client.execute(cmd, dict(args) if args else None)

    def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one agent command and return its ``return`` value.

        Raises:
            GuestError: the agent reported an error.
            GuestToolsMissing: the agent is not connected (call :meth:`wait` first).
            VmTimeout: no answer within ``timeout`` (default ``call_timeout``).
        """
        if self._client is None:
            raise GuestToolsMissing("the guest agent is not connected")
        try:
            return self.loop.run(self._aexecute(cmd, args), timeout or self.call_timeout, f"qemu-ga {cmd}")
        except ExecuteError as exc:
            raise GuestError(f"qemu-ga {cmd}: {exc}") from exc
        except QMPError as exc:
            self.close()
            raise GuestToolsMissing(f"qemu-ga {cmd}: the connection to the agent broke: {exc}") from exc

    def resync(self, timeout: float = 10.0) -> None:
        """Reconnect and re-sync (after a restore the agent's channel state is unknown).

        Raises:
            GuestToolsMissing: no answer within ``timeout``.
        """
        self.close()
        self.wait(timeout, lambda: None)

    # -- programs --------------------------------------------------------------
    def exec(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start a program with its output captured; return its guest pid.

        Raises:
            GuestError: the agent could not start it.
        """
        args: dict[str, object] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if env:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        return int(self.execute("guest-exec", args)["pid"])

    def exec_status(self, pid: int) -> ExecStatus:
        """Poll a program started with :meth:`exec` (the agent forgets it after reporting its end).

        Raises:
            GuestError: the agent does not know ``pid``.
        """
        r = self.execute("guest-exec-status", {"pid": pid})
        return ExecStatus(
            exited=bool(r["exited"]),
            exit_code=r.get("exitcode"),
            signal=r.get("signal"),
            stdout=base64.b64decode(r.get("out-data", "")),
            stderr=base64.b64decode(r.get("err-data", "")),
            truncated=bool(r.get("out-truncated") or r.get("err-truncated")),
        )

    # -- files -----------------------------------------------------------------
    def open(self, path: str, mode: str) -> int:
        """Open a guest file; return the agent's handle.

        Raises:
            GuestError: it cannot be opened (the message says why, e.g. no such file).
        """
        return int(self.execute("guest-file-open", {"path": path, "mode": mode}))

    def close_file(self, handle: int) -> None:
        """Close a handle from :meth:`open`."""
        self.execute("guest-file-close", {"handle": handle})

    def size(self, handle: int) -> int:
        """The size of an open file (the position is left at the start)."""
        end = int(
            self.execute("guest-file-seek", {"handle": handle, "offset": 0, "whence": "end"})["position"]
        )
        self.execute("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"})
        return end

    def read(self, handle: int, count: int = CHUNK) -> tuple[bytes, bool]:
        """Read up to ``count`` bytes; return them and whether the end was reached."""
        r = self.execute("guest-file-read", {"handle": handle, "count": count})
        return base64.b64decode(r["buf-b64"]), bool(r["eof"])

    def write(self, handle: int, data: bytes) -> None:
        """Write all of ``data``.

        Raises:
            GuestError: the agent wrote less than asked.
        """
        r = self.execute("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
        if int(r["count"]) != len(data):
            raise GuestError(f"qemu-ga guest-file-write wrote {r['count']} of {len(data)} bytes")

    def set_time(self, ns: int | None = None) -> None:
        """Set the guest clock (to the host's now by default)."""
        self.execute("guest-set-time", {"time": time.time_ns() if ns is None else ns})


def is_missing_file(exc: GuestError) -> bool:
    """True when an agent error says the file does not exist."""
    return "No such file" in str(exc) or "not found" in str(exc).lower()
