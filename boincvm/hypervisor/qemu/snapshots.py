"""Checkpoints of a QEMU VM: taking, listing, restoring and deleting them.

A VM started from a golden checkpoint checkpoints what its guest wrote (:mod:`.ramdiff`):
the pages of RAM it owns, the device state and a qcow2 internal snapshot of the disk,
the VM paused for about 0.05 s. Other VMs (booted cold, or where the host does not let
this process read QEMU's memory) take qcow2 internal snapshots through QMP
``snapshot-save`` jobs (memory and disk in one file, the VM paused for about 0.1-0.3 s).
Either is complete before it is listed: qcow2 writes a snapshot's data before it links
it into the snapshot table, and a checkpoint directory is renamed into place once its
files are on disk, so a QEMU killed half way through leaves the earlier checkpoints
loadable (tested in ``tests/integration``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from boincvm import proc
from boincvm.errors import HypervisorError, VmTimeout
from boincvm.hashing import sha256_file
from boincvm.hypervisor.base import SnapshotInfo, VmSpec, polls
from boincvm.hypervisor.qemu import cmdline as cl
from boincvm.hypervisor.qemu import golden as qemu_golden
from boincvm.hypervisor.qemu import ramdiff
from boincvm.hypervisor.qemu import xfer as qemu_xfer
from boincvm.hypervisor.qemu.machine import OVERLAY, QemuMachine

log = logging.getLogger(__name__)


class QemuSnapshots(QemuMachine):
    """The checkpoint layer of :class:`~boincvm.hypervisor.qemu.backend.QemuBackend`."""

    def __init__(self, spec: VmSpec) -> None:
        super().__init__(spec)
        #: The golden RAM the running QEMU maps privately (its checkpoints are diffs against it).
        self._ram_private: Path | None = None
        #: The running QEMU was restored from a RAM diff: its streams lack the configuration
        #: section, so it can take no other kind of snapshot.
        self._diff_restored = False
        #: Why this host does not let us read QEMU's memory (then snapshot-save is used).
        self._diff_refused: str | None = None

    @property
    def _ram_bytes(self) -> int:
        return self.spec.memory_mb * 1024 * 1024

    def _run_job(self, cmd: str, args: Mapping[str, object]) -> None:
        job_id = f"boincvm-{uuid.uuid4().hex[:12]}"
        self.qmp(cmd, {"job-id": job_id, **args})
        for _ in polls(self.opts.snapshot_timeout, 0.01):
            jobs = self.qmp("query-jobs")
            job = next((j for j in jobs if j.get("id") == job_id), None)
            if job is None:
                raise HypervisorError(f"qemu: {cmd} job {job_id} vanished")
            if job["status"] == "concluded":
                self.qmp("job-dismiss", {"id": job_id})
                if job.get("error"):
                    raise HypervisorError(f"qemu: {cmd}: {job['error']}")
                return
        raise VmTimeout(f"qemu: {cmd} did not finish within {self.opts.snapshot_timeout:g} s")

    # -- taking ---------------------------------------------------------------
    def snapshot_create(self, name: str) -> None:
        """Save memory, device state and disk as checkpoint ``name``: a diff against the
        golden RAM where the VM maps one (:mod:`.ramdiff`), else an internal snapshot of
        the overlay with all of memory.

        Raises:
            HypervisorError: a snapshot of that name exists, or saving failed.
        """
        if any(s.name == name for s in self.snapshot_list()):
            raise HypervisorError(f"qemu: snapshot {name!r} already exists; checkpoints need new names")
        # A transfer disk still in the guest would be in the snapshot, which then cannot load.
        qemu_xfer.release_leftovers(self)
        if self._ram_private is not None:  # a task that runs for weeks keeps its golden checkpoint
            qemu_golden.mark_used(self._ram_private)
        if self._diff_possible():
            try:
                self._diff_checkpoint(name)
                return
            except HypervisorError as exc:
                if self._diff_restored or not self.is_running():
                    raise
                # E.g. a security module refusing the reads: the other kind, from now on.
                self._diff_refused = exc.message
                log.warning("a RAM-diff checkpoint failed (%s); checkpoints hold all of RAM now", exc.message)
        self._run_job("snapshot-save", {"tag": name, "vmstate": cl.DISK_NODE, "devices": [cl.DISK_NODE]})

    def _diff_possible(self) -> bool:
        """Whether this VM's checkpoints can be RAM diffs: it maps a golden RAM privately
        and the host lets this process read QEMU's page map and memory."""
        if self._ram_private is None or self._popen is None:
            return False
        if self._diff_restored:
            return True  # it cannot take the other kind; a refusal shows as an error
        if self._diff_refused is None:
            try:
                for what in ("pagemap", "mem"):
                    os.close(os.open(f"/proc/{self._popen.pid}/{what}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                self._diff_refused = exc.strerror or str(exc)
                log.warning(
                    "cannot read QEMU's memory (%s): checkpoints hold all of the guest's RAM",
                    self._diff_refused,
                )
        return self._diff_refused is None

    def _diff_checkpoint(self, name: str) -> None:
        if name in [s.name for s in self._internal_snapshots()]:  # left by a checkpoint that never completed
            self._delete_disk_snapshot(name)
        try:
            target = ramdiff.checkpoint_dir(self.workdir, name)
            m = ramdiff.write(target, lambda tmp: self._save_diff(name, tmp))
        except OSError as exc:
            raise HypervisorError(f"qemu: checkpoint {name} could not be written: {exc}") from exc
        log.debug("checkpoint %s: %d pages of RAM (%d zero), %d bytes", name, m.saved.pages,
                  m.saved.zero_pages, m.saved.data_bytes)  # fmt: skip

    def _save_diff(self, name: str, tmp: Path) -> ramdiff.Manifest:
        """Write checkpoint ``name``'s RAM diff and devices into ``tmp``, its disk as an internal snapshot."""
        assert self._popen is not None and self._ram_private is not None
        pid, ram = self._popen.pid, self._ram_private
        running = bool(self.qmp("query-status").get("running"))
        if running:
            self.qmp("stop")
        try:
            self.qmp("blockdev-snapshot-internal-sync", {"device": cl.DISK_NODE, "name": name})
            try:
                # live=false: with live on, a stopped VM would also give up its disk locks.
                devices = tmp / ramdiff.DEVICES_FILE
                self.qmp("xen-save-devices-state", {"filename": str(devices), "live": False})
                saved = ramdiff.save_ram(pid, ram, tmp / ramdiff.RAM_FILE)
            except BaseException:
                with contextlib.suppress(HypervisorError, VmTimeout):
                    self._delete_disk_snapshot(name)
                raise
        finally:
            if running:
                self.qmp("cont")
        digests = (sha256_file(tmp / ramdiff.RAM_FILE), sha256_file(devices))
        return ramdiff.Manifest(ram, self._ram_bytes, *digests, saved)

    def _delete_disk_snapshot(self, name: str) -> None:
        self.qmp("blockdev-snapshot-delete-internal-sync", {"device": cl.DISK_NODE, "name": name})

    # -- listing --------------------------------------------------------------
    def _offline_snapshots(self) -> list[SnapshotInfo]:
        overlay = self._path(OVERLAY)
        if not overlay.exists():
            return []
        argv: list[str | Path] = [*self.tools.img_command(), "info", "-U", "--output=json", overlay]
        info = json.loads(proc.run(argv, timeout=60).text)
        return self._complete(
            [SnapshotInfo(s["name"], s.get("vm-state-size")) for s in info.get("snapshots", [])]
        )

    def _complete(self, internal: list[SnapshotInfo]) -> list[SnapshotInfo]:
        """The checkpoints among the overlay's internal snapshots: those with memory, and the
        disk halves of complete RAM-diff checkpoints (sized by their directory)."""
        diffs = set(ramdiff.names(self.workdir))
        out = []
        for s in internal:
            if s.name in diffs:
                out.append(SnapshotInfo(s.name, ramdiff.size(ramdiff.checkpoint_dir(self.workdir, s.name))))
            elif s.size_bytes:
                out.append(s)
        return out

    def _internal_snapshots(self) -> list[SnapshotInfo]:
        for node in self.qmp("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == cl.DISK_NODE:
                snaps = node.get("image", {}).get("snapshots", [])
                return [SnapshotInfo(s["name"], s.get("vm-state-size")) for s in snaps]
        return []

    def snapshot_list(self) -> list[SnapshotInfo]:
        """The VM's checkpoints (read through QMP while running, qemu-img otherwise)."""
        if not self.is_running():
            return self._offline_snapshots()
        return self._complete(self._internal_snapshots())

    # -- restoring ------------------------------------------------------------
    def snapshot_revert(self, name: str) -> None:
        """Load snapshot ``name`` into the running VM, continue it and set the guest clock.

        Raises:
            HypervisorError: no such snapshot, or loading failed.
        """
        if ramdiff.is_complete(ramdiff.checkpoint_dir(self.workdir, name)):
            # A diff applies to the golden RAM alone: a new QEMU starts from it.
            self.power_off()
            self.power_on(snapshot=name)
            return
        self._start_t0, self.start_timings = time.monotonic(), {}
        self._run_job("snapshot-load", {"tag": name, "vmstate": cl.DISK_NODE, "devices": [cl.DISK_NODE]})
        self._ensure_running()
        self._finished.clear()
        self._after_restore()

    def _prepare_diff_restore(self, name: str, diff: Path) -> Path:
        """Check checkpoint ``diff`` whole and its golden RAM there, put the disk back to
        its snapshot; the golden RAM to map.

        Raises:
            HypervisorError: damaged, the golden RAM gone or of another size, or qemu-img failed.
        """
        manifest = ramdiff.read_manifest(diff, verify=True)
        ram = manifest.golden_ram
        want = self._ram_bytes
        if manifest.ram_bytes != want:
            raise HypervisorError(
                f"qemu: checkpoint {name} holds {manifest.ram_bytes} bytes of RAM, the VM has {want}"
            )
        try:
            size = ram.stat().st_size
        except OSError as exc:
            raise HypervisorError(
                f"qemu: checkpoint {name} applies to the golden RAM {ram}, which is gone ({exc.strerror})",
                hint="the boincvm cache was cleared while the task had a checkpoint; the task starts again",
            ) from exc
        if size != want:
            raise HypervisorError(
                f"qemu: the golden RAM {ram} of checkpoint {name} has {size} bytes, not {want}"
            )
        proc.run([*self.tools.img_command(), "snapshot", "-a", name, self._path(OVERLAY)], timeout=120)
        return ram

    def _restore_diff(self, args: cl.QemuArgs, diff: Path) -> None:
        """Start QEMU on the golden RAM, write the checkpoint's pages into it, load its devices."""
        fd = os.open(diff / ramdiff.DEVICES_FILE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._spawn(
                dataclasses.replace(args, incoming="defer", loadvm=None, devices_only=True), pass_fds=(fd,)
            )
        finally:
            os.close(fd)  # QEMU holds its own copy, under the same number
        assert self._popen is not None and args.ram_file is not None
        self._diff_restored = True
        ramdiff.load_ram(self._popen.pid, args.ram_file, diff / ramdiff.RAM_FILE, self._ram_bytes)
        self.qmp("migrate-incoming", {"uri": f"fd:{fd}"})
        self._wait_incoming(f"checkpoint {diff.name}")
        self._ensure_running()
        self._after_restore()

    def _wait_incoming(self, what: str) -> None:
        for _ in polls(60, 0.005):
            if self.qmp("query-status").get("status") != "inmigrate":
                break
        else:
            raise VmTimeout(f"qemu: loading {what} of {self.spec.name} took over 60 s")
        status = self.qmp("query-migrate").get("status")
        if status not in (None, "completed"):
            raise HypervisorError(f"qemu: loading {what} failed ({status})")

    # -- deleting -------------------------------------------------------------
    def snapshot_delete(self, name: str) -> None:
        """Delete snapshot ``name`` (through QMP while running, qemu-img otherwise).

        Raises:
            HypervisorError: no such snapshot, or deleting failed.
        """
        ramdiff.remove(ramdiff.checkpoint_dir(self.workdir, name))  # first: then it is no checkpoint
        if self.is_running():
            self._run_job("snapshot-delete", {"tag": name, "devices": [cl.DISK_NODE]})
        else:
            proc.run([*self.tools.img_command(), "snapshot", "-d", name, self._path(OVERLAY)], timeout=120)
