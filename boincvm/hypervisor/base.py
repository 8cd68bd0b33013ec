"""The hypervisor backend interface every backend implements, and the registry of backends.

The interface follows the steps of the wrapper: power on from a read-only base image
through a per-slot copy-on-write overlay, wait for the guest tools, run and poll guest
programs, copy files in and out, pause and continue, take / list / revert to / delete
snapshots, report host CPU time, power off softly then firmly.

A backend registers itself by kind::

    class QemuBackend(Backend, kind=BackendKind.QEMU): ...

and is found with :func:`backend_class`. Operations a backend cannot do raise
:class:`~boincvm.errors.UnsupportedOperation` naming the backend and why.
"""

from __future__ import annotations

import enum
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from boincvm.errors import HypervisorUnavailable, InputError, UnsupportedOperation, VmTimeout


class BackendKind(enum.StrEnum):
    """The hypervisors boincvm can drive."""

    QEMU = "qemu"
    VMWARE = "vmware"


@dataclass(frozen=True)
class Availability:
    """Whether a backend (or an accelerator) can run here, and if not, exactly why."""

    ok: bool
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class VmSpec:
    """Everything a backend needs to build one VM for one slot.

    Attributes:
        name: a name unique on this host (used in process titles and VM names).
        workdir: a private directory for the overlay, sockets, logs and state; it
            survives a wrapper restart so a checkpoint can be resumed from it.
        image: the read-only base disk image (qcow2, raw, vmdk or a VMware .vmx), or None.
        kernel: a kernel to boot directly (QEMU), or None.
        initrd: an initramfs for ``kernel``, or None.
        kernel_cmdline: extra kernel command line for ``kernel``.
        memory_mb: guest memory.
        ncpus: guest virtual CPUs.
        enable_network: give the guest a network (off unless the job asks).
        boot_timeout: seconds to wait for the guest tools after power-on.
        options: backend-specific settings (e.g. QEMU machine type, VMware credentials file).
        image_files: a multi-file image (a VMware VM directory shipped as app-version files):
            each file's name in the VM directory -> where it is on this host; ``image`` is one
            of these paths. Empty for single-file images. The backend rebuilds the directory
            in ``workdir`` and never writes to these files.
        resolve_file: where a file that ``options`` names by its logical name (an app-version
            file, e.g. QEMU's ``runtime``) is on this host; the wrapper passes the slot's
            link-file resolution. None: such option values are host paths already.
    """

    name: str
    workdir: Path
    image: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_cmdline: str = ""
    memory_mb: int = 512
    ncpus: int = 1
    enable_network: bool = False
    boot_timeout: float = 120.0
    options: Mapping[str, str] = field(default_factory=dict)
    image_files: Mapping[str, Path] = field(default_factory=dict)
    resolve_file: Callable[[str], Path] | None = None


@dataclass(frozen=True)
class GuestProcess:
    """A program started in the guest."""

    pid: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ProcessStatus:
    """What a poll of a guest program says.

    ``exit_code`` is None while the program runs; ``signal`` is set when it was killed
    by one. The output tails are what the guest tools captured (possibly truncated).
    """

    running: bool
    exit_code: int | None = None
    signal: int | None = None
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""

    @property
    def succeeded(self) -> bool:
        """True when the program has ended with exit code 0."""
        return not self.running and self.exit_code == 0 and self.signal is None


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of a VM."""

    name: str
    size_bytes: int | None = None


class Backend(ABC):
    """One VM, driven through one hypervisor.

    A backend object is a context manager: leaving the ``with`` block powers the VM
    off (softly, then firmly) whatever happened inside it. Every wait is bounded.

    Raises (any method):
        HypervisorError: the hypervisor failed or the VM died.
        VmTimeout: a bounded wait ran out.
        GuestError: the guest tools reported a failure.
        UnsupportedOperation: this backend cannot do that at all.
    """

    kind: ClassVar[BackendKind]
    #: MiB the hypervisor process needs beyond the guest's memory (the host-memory check adds it).
    memory_overhead_mb: ClassVar[int] = 256
    _registry: ClassVar[dict[BackendKind, type[Backend]]] = {}

    def __init_subclass__(cls, kind: BackendKind | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            Backend._registry[kind] = cls

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec

    @classmethod
    def check_options(cls, options: Mapping[str, str]) -> None:
        """Check backend options (``VmSpec.options``) before any VM exists; this backend takes none.

        Raises:
            InputError: an unknown option or a value the backend does not accept.
        """
        for key in options:
            raise InputError(f"options.{key}: the {cls.kind.value} backend takes no options")

    # -- availability ---------------------------------------------------------
    @classmethod
    @abstractmethod
    def probe(cls) -> Availability:
        """Say whether this backend can run on this host, and if not, exactly why."""

    def availability(self) -> Availability:
        """Say whether this VM, as its spec sets it up, can run here: :meth:`probe` unless the
        spec changes the answer (a QEMU job that brings its own QEMU needs none installed)."""
        return type(self).probe()

    # -- power ----------------------------------------------------------------
    @abstractmethod
    def power_on(self, *, snapshot: str | None = None) -> None:
        """Start the VM, fresh or from ``snapshot`` (which may have been taken by an earlier process).

        The base image is never written; all writes go to the slot's overlay.
        """

    @abstractmethod
    def wait_for_tools(self, timeout: float | None = None) -> None:
        """Block until the guest tools answer, at most ``timeout`` (default: the spec's boot timeout).

        Raises:
            GuestToolsMissing: they did not answer in time.
        """

    @abstractmethod
    def power_off(self, *, soft_timeout: float = 10.0) -> None:
        """Stop the VM: softly, then firmly; afterwards no hypervisor process is left. Idempotent."""

    @abstractmethod
    def is_running(self) -> bool:
        """True while the VM process exists."""

    def pause(self) -> None:
        """Stop the guest's CPUs (the VM keeps its memory). Guest time and host CPU use stop."""
        raise UnsupportedOperation(f"{self.kind}: pause is not supported")

    def resume(self) -> None:
        """Continue a paused guest."""
        raise UnsupportedOperation(f"{self.kind}: resume is not supported")

    # -- guest programs -------------------------------------------------------
    @abstractmethod
    def start_program(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> GuestProcess:
        """Start a program in the guest without waiting for it."""

    @abstractmethod
    def poll_program(self, proc: GuestProcess) -> ProcessStatus:
        """Say whether ``proc`` still runs, and its exit code and output once it has ended."""

    def run_program(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ProcessStatus:
        """Run a program in the guest and wait for it (bounded by ``timeout``)."""
        proc = self.start_program(argv, env=env, cwd=cwd)
        # Most guest commands last 30-150 ms: a slow growth sees their end within a fifth
        # of its time (doubling saw a 100 ms command end at 150 ms).
        for _ in polls(timeout, 0.01, max_interval=0.2, growth=1.25):
            status = self.poll_program(proc)
            if not status.running:
                return status
        raise VmTimeout(f"{self.kind}: {argv[0]} did not finish in the guest within {timeout:g} s")

    # -- files ----------------------------------------------------------------
    @abstractmethod
    def copy_to_guest(self, host_path: Path, guest_path: str) -> None:
        """Copy a host file into the guest (parent directories must exist)."""

    @abstractmethod
    def copy_from_guest(self, guest_path: str, host_path: Path, *, max_bytes: int | None = None) -> int:
        """Copy a guest file to the host and return its size.

        Raises:
            OutputError: the file is missing, or larger than ``max_bytes`` (nothing is left at ``host_path``).
        """

    @abstractmethod
    def read_guest_file(self, guest_path: str, *, max_bytes: int = 65536) -> bytes | None:
        """Return a small guest file's contents (at most ``max_bytes``), or None if it does not exist."""

    # -- snapshots ------------------------------------------------------------
    def snapshot_create(self, name: str) -> None:  # noqa: ARG002 - default for backends without snapshots
        """Take a snapshot of the running VM (memory and disk) named ``name``; returns once it is complete."""
        raise UnsupportedOperation(f"{self.kind}: snapshots are not supported")

    def snapshot_list(self) -> list[SnapshotInfo]:
        """List the VM's snapshots."""
        raise UnsupportedOperation(f"{self.kind}: snapshots are not supported")

    def snapshot_revert(self, name: str) -> None:  # noqa: ARG002
        """Return the running VM to snapshot ``name``."""
        raise UnsupportedOperation(f"{self.kind}: snapshots are not supported")

    def snapshot_delete(self, name: str) -> None:  # noqa: ARG002
        """Delete snapshot ``name``."""
        raise UnsupportedOperation(f"{self.kind}: snapshots are not supported")

    # -- accounting -----------------------------------------------------------
    @abstractmethod
    def host_cpu_time(self) -> float:
        """CPU seconds the hypervisor process tree has used on the host for this VM."""

    def guest_cpu_time(self) -> float | None:
        """CPU seconds the guest says it has used, or None if the backend cannot tell."""
        return None

    # -- acceleration ---------------------------------------------------------
    @property
    def accel_name(self) -> str:
        """The accelerator the VM runs under (``kvm``, ``tcg``), or "" where there is no choice."""
        return ""

    @property
    def accel_note(self) -> str | None:
        """A sentence for the user when the VM runs slower than it could (no KVM), else None."""
        return None

    def check_accel(self) -> Availability:
        """Before power-on: can this host run the VM with hardware acceleration (KVM)?

        ``ok`` False means the VM would run emulated (much slower): ``reason`` says why and
        ``detail`` how the host's owner can fix it. A backend without the choice answers ok.
        """
        return Availability(True, f"{self.kind}: hardware acceleration is not a choice here")

    # -- context manager ------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.power_off()
            return
        # Leaving because of an error: stop the VM, but never hide that error behind another.
        try:
            self.power_off()
        except Exception as second:  # noqa: BLE001
            logging.getLogger(__name__).warning("powering off after an error failed too: %s", second)


def polls(
    timeout: float, interval: float, *, max_interval: float | None = None, growth: float = 2.0
) -> Iterator[None]:
    """The turns of a bounded wait: ``for _ in polls(30, 0.01): if done(): break`` (``else``: timed out).

    The first turn comes at once; after each turn, the wait ends once ``timeout`` seconds
    have passed since it began, else it sleeps ``interval`` (growing by ``growth`` each turn
    up to ``max_interval`` when given) before the next turn. So the condition is always
    tested once more after the last sleep, and the loop ends by itself instead of waiting
    forever.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        yield
        if time.monotonic() > deadline:
            return
        time.sleep(delay)
        if max_interval is not None:
            delay = min(delay * growth, max_interval)


def backend_class(kind: BackendKind | str) -> type[Backend]:
    """Return the backend class registered for ``kind``.

    Raises:
        HypervisorUnavailable: no such backend.
    """
    import importlib

    try:
        backend_kind = BackendKind(kind)
        # A backend registers itself when its module is imported; import only the one asked for.
        importlib.import_module(f"boincvm.hypervisor.{backend_kind.value}.backend")
        return Backend._registry[backend_kind]
    except (ValueError, KeyError):
        known = ", ".join(sorted(k.value for k in Backend._registry))
        raise HypervisorUnavailable(f"unknown backend {kind!r}", hint=f"choose one of: {known}") from None
