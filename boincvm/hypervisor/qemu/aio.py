"""A private asyncio loop in a daemon thread, so synchronous backends can use ``qemu.qmp``.

Every call is bounded: the coroutine runs under ``asyncio.wait_for`` and a timeout
becomes :class:`~boincvm.errors.VmTimeout` with the caller's sentence. The thread lives
as long as the process, which also makes it the right thread to start QEMU from: a
parent-death signal fires when the *thread* that forked dies, not only the process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from boincvm.errors import VmTimeout

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in one daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="boincvm-qemu-io", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """Run ``coro`` on the loop and return its result, waiting at most ``timeout`` seconds.

        Raises:
            VmTimeout: it did not finish in time (``what`` says what was being waited for).
        """

        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        future = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            future.cancel()
            raise VmTimeout(f"{what} did not complete within {timeout:g} s") from None

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run a plain function in the loop thread (e.g. to fork a process from it)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout, "a call in the I/O thread")

    def spawn(self, aw: Awaitable[T]) -> None:
        """Schedule ``aw`` without waiting for it (fire and forget, e.g. a disconnect)."""

        async def wrapped() -> None:
            await aw

        asyncio.run_coroutine_threadsafe(wrapped(), self.loop)


_lock = threading.Lock()
_shared: LoopThread | None = None


def shared_loop() -> LoopThread:
    """The one I/O thread all QEMU backends of this process share (started on first use)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared
