"""The QEMU backend against real guests under TCG: no fakes, no skips."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm import proc
from boincvm.errors import GuestToolsMissing, HypervisorError, OutputError
from boincvm.hypervisor.base import GuestProcess, VmSpec
from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import spec_for_image

pytestmark = pytest.mark.integration

COUNTER = 'i=0; while :; do i=$((i+1)); echo "$$ $i" > /scratch/boincvm/counter; sleep 0.05; done'


def make_spec(image: Path, workdir: Path, name: str) -> VmSpec:
    return spec_for_image(image, name=name, workdir=workdir, boot_timeout=60)


def qemu_pid(vm: QemuBackend) -> int:
    assert vm._popen is not None
    return vm._popen.pid


def counter(vm: QemuBackend) -> tuple[int, int]:
    # The guest loop rewrites the file with a truncating echo: retry a read that lands in between.
    deadline = time.monotonic() + 10
    while True:
        data = vm.read_guest_file("/scratch/boincvm/counter")
        if data and len(data.split()) == 2:
            pid, n = data.split()
            return int(pid), int(n)
        assert time.monotonic() < deadline, "the counter file is missing"
        time.sleep(0.02)


def wait_counter(vm: QemuBackend, above: int, timeout: float = 20.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        pid, n = counter(vm)
        if n > above:
            return pid, n
        assert time.monotonic() < deadline, "the guest counter does not advance"
        time.sleep(0.1)


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def vm(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuBackend]:
    backend = QemuBackend(make_spec(guest_image, tmp_path_factory.mktemp("vm"), "itest"))
    with backend:
        backend.power_on()
        backend.wait_for_tools()
        yield backend


def test_exec_exit_codes_and_output(vm: QemuBackend) -> None:
    st = vm.run_program(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (st.running, st.exit_code, st.stdout_tail, st.stderr_tail) == (False, 7, b"out\n", b"err\n")
    assert vm.run_program(["true"], timeout=30).succeeded
    st = vm.run_program(["/bin/sh", "-c", 'pwd; echo "$GREETING"'], env={"GREETING": "hi there"},
                        cwd="/scratch/boincvm", timeout=30)  # fmt: skip
    assert st.stdout_tail == b"/scratch/boincvm\nhi there\n"
    st = vm.run_program(["/bin/sh", "-c", "kill -9 $$"], timeout=30)
    assert st.signal == 9 and not st.succeeded


def test_file_round_trip(vm: QemuBackend, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024 + 13)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    guest = "/scratch/boincvm/odd name 'ä' $x.bin"
    vm.copy_to_guest(src, guest)
    st = vm.run_program(["sha256sum", guest], timeout=60)
    assert st.stdout_tail.split()[0].decode() == hashlib.sha256(data).hexdigest()
    back = tmp_path / "out ä.bin"
    assert vm.copy_from_guest(guest, back) == len(data)
    assert back.read_bytes() == data


def test_copy_out_limits(vm: QemuBackend, tmp_path: Path) -> None:
    vm.run_program(["/bin/sh", "-c", "head -c 5000 /dev/zero > /tmp/five"], timeout=30)
    target = tmp_path / "five"
    with pytest.raises(OutputError, match="more than the 4999"):
        vm.copy_from_guest("/tmp/five", target, max_bytes=4999)
    with pytest.raises(OutputError, match="does not exist"):
        vm.copy_from_guest("/tmp/none", target)
    assert list(tmp_path.iterdir()) == []
    assert vm.copy_from_guest("/tmp/five", target, max_bytes=5000) == 5000
    assert vm.read_guest_file("/tmp/none") is None
    assert vm.read_guest_file("/tmp/five", max_bytes=10) == b"\0" * 10


def test_pause_stops_the_guest(vm: QemuBackend) -> None:
    busy = vm.start_program(["/bin/sh", "-c", "i=0; while [ $i -lt 100000000 ]; do i=$((i+1)); done"])
    vm.start_program(["/bin/sh", "-c", COUNTER])
    _, n0 = wait_counter(vm, 0)
    vm.pause()
    try:
        cpu0 = vm.host_cpu_time()
        time.sleep(2.0)
        cpu1 = vm.host_cpu_time()
    finally:
        vm.resume()
    _, n1 = counter(vm)
    assert n1 <= n0 + 2  # at most what was in flight when the CPUs stopped
    assert cpu1 - cpu0 < 0.5, f"a paused VM used {cpu1 - cpu0:.2f} s of host CPU in 2 s"
    wait_counter(vm, n1)
    vm.run_program(["kill", str(busy.pid)], timeout=30)
    guest_cpu = vm.guest_cpu_time()
    assert guest_cpu is not None and guest_cpu > 0.5


@pytest.mark.parametrize("golden", ["auto", "no"], ids=["ram-diff", "snapshot-save"])
def test_snapshot_survives_sigkill_and_resumes_in_a_new_process(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, golden: str
) -> None:
    """Both kinds of checkpoint: a diff against the golden RAM (a VM started from a golden
    checkpoint) and a ``snapshot-save`` with all of RAM (a VM booted cold)."""
    from boincvm.hypervisor.qemu import ramdiff

    spec = spec_for_image(
        guest_image, name="ckpt", workdir=tmp_path, boot_timeout=60, options={"golden": golden}
    )
    first = QemuBackend(spec)
    try:
        first.power_on()
        first.wait_for_tools()
        loop = first.start_program(["/bin/sh", "-c", COUNTER])
        pid, _ = wait_counter(first, 3)
        first.snapshot_create("ck1")
        (ck1,) = first.snapshot_list()
        assert ck1.name == "ck1"
        assert ramdiff.is_complete(ramdiff.checkpoint_dir(tmp_path, "ck1")) == (golden == "auto")
        _, at_ck1 = counter(first)
        wait_counter(first, at_ck1 + 5)
        # Kill QEMU in the middle of a second snapshot: ck1 must stay restorable.
        if golden == "auto":  # while the RAM is being read, disk snapshot and devices saved
            save_ram = ramdiff.save_ram

            def killed_midway(qemu: int, ram: Path, out: Path) -> ramdiff.Saved:
                os.kill(qemu, signal.SIGKILL)
                assert gone(qemu)
                return save_ram(qemu, ram, out)

            monkeypatch.setattr(ramdiff, "save_ram", killed_midway)
            with pytest.raises(Exception):  # noqa: B017 - whatever the half-done call raises
                first.snapshot_create("ck2")
            monkeypatch.undo()
            assert not (tmp_path / ramdiff.CHECKPOINTS / "ck2").exists()
        else:  # once the snapshot-save job runs
            run_job = first._run_job

            def kill_in_job(cmd: str, args: dict[str, object]) -> None:
                if cmd == "snapshot-save":
                    threading.Timer(0.02, os.kill, (qemu_pid(first), signal.SIGKILL)).start()
                run_job(cmd, args)

            monkeypatch.setattr(first, "_run_job", kill_in_job)
            with pytest.raises(Exception):  # noqa: B017 - whatever the half-done call raises
                first.snapshot_create("ck2")
    finally:
        first.power_off()
    check = proc.run(["qemu-img", "check", "-q", tmp_path / "disk.qcow2"], timeout=60, check=False)
    assert check.returncode in (0, 3), check.stderr  # 3: leaked clusters only, harmless

    second = QemuBackend(spec)
    with second:
        assert [s.name for s in second.snapshot_list()] == ["ck1"]
        t0 = time.monotonic()
        second.power_on(snapshot="ck1")
        restore = time.monotonic() - t0
        same_pid, n = counter(second)
        assert same_pid == pid
        assert n >= at_ck1 - 1
        later_pid, later = wait_counter(second, n + 3)
        assert later_pid == pid
        assert second.poll_program(GuestProcess(loop.pid, loop.argv)).running
        assert "ck1" in [s.name for s in second.snapshot_list()]
        # The guest clock was set after the restore.
        st = second.run_program(["date", "+%s"], timeout=30)
        assert abs(int(st.stdout_tail) - time.time()) < 5
        # A restored VM checkpoints again, and that checkpoint restores too.
        second.snapshot_create("ck3")
        _, at_ck3 = counter(second)
    with QemuBackend(spec) as third:
        third.power_on(snapshot="ck3")
        same_pid, n = counter(third)
        assert same_pid == pid and n >= at_ck3 - 1
        wait_counter(third, n + 3)
    print(f"restore to agent in a new process: {restore:.2f} s")


def test_a_ram_diff_holds_what_the_guest_wrote_and_refuses_damage(guest_image: Path, tmp_path: Path) -> None:
    """The diff checkpoint of a guest that wrote 24 MiB into its RAM (tmpfs) holds about that,
    whatever its RAM size; a checkpoint whose file was altered is refused, not loaded."""
    from boincvm.hypervisor.qemu import ramdiff

    sizes = {}
    for mem in (256, 1024):
        spec = spec_for_image(
            guest_image, name=f"diff{mem}", workdir=tmp_path / str(mem), boot_timeout=60, memory_mb=mem
        )
        with QemuBackend(spec) as vm:
            vm.power_on()
            vm.wait_for_tools()
            before = vm.run_program(
                ["/bin/sh", "-c", "head -c 25165824 /dev/urandom > /tmp/blob"], timeout=120
            )
            assert before.exit_code == 0
            digest = vm.run_program(["/bin/sh", "-c", "md5sum < /tmp/blob"], timeout=60).stdout_tail
            vm.snapshot_create("ck")
            d = ramdiff.checkpoint_dir(spec.workdir, "ck")
            m = ramdiff.read_manifest(d, verify=True)
            sizes[mem] = m.saved.data_bytes
            assert m.ram_bytes == mem * 1024 * 1024
        with QemuBackend(spec) as again:
            again.power_on(snapshot="ck")
            assert (
                again.run_program(["/bin/sh", "-c", "md5sum < /tmp/blob"], timeout=60).stdout_tail == digest
            )
    assert 24 * 2**20 <= sizes[256] < 48 * 2**20, sizes
    assert sizes[1024] < sizes[256] * 1.3, sizes
    # One flipped byte in the RAM file: the digest check refuses it before QEMU starts.
    ram = ramdiff.checkpoint_dir(tmp_path / "256", "ck") / ramdiff.RAM_FILE
    data = bytearray(ram.read_bytes())
    data[4096] ^= 1
    ram.write_bytes(bytes(data))
    spec = spec_for_image(
        guest_image, name="diff256", workdir=tmp_path / "256", boot_timeout=60, memory_mb=256
    )
    with QemuBackend(spec) as vm, pytest.raises(HypervisorError, match="does not match its digest"):
        vm.power_on(snapshot="ck")
    assert not vm.is_running()


def test_a_ram_diff_the_host_refuses_falls_back_to_snapshot_save_for_good(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose security policy refuses the reads of QEMU's memory still checkpoints:
    the VM takes the kind that holds all of RAM from then on, and it restores."""
    from boincvm.hypervisor.qemu import ramdiff

    calls = []

    def refused(qemu: int, ram: Path, out: Path) -> ramdiff.Saved:
        calls.append(qemu)
        raise HypervisorError(f"qemu: cannot open /proc/{qemu}/mem: Permission denied")

    monkeypatch.setattr(ramdiff, "save_ram", refused)
    spec = make_spec(guest_image, tmp_path, "refused")
    with QemuBackend(spec) as vm:
        vm.power_on()
        vm.wait_for_tools()
        vm.run_program(["/bin/sh", "-c", "echo kept > /scratch/boincvm/f"], timeout=30)
        vm.snapshot_create("a")
        vm.snapshot_create("b")
        assert len(calls) == 1  # tried once, then never again
        snaps = {s.name: s.size_bytes for s in vm.snapshot_list()}
        assert set(snaps) == {"a", "b"} and all(snaps.values())  # both hold RAM
        assert not (tmp_path / ramdiff.CHECKPOINTS / "a").exists()
        vm.snapshot_delete("a")
    with QemuBackend(spec) as again:
        again.power_on(snapshot="b")
        assert again.read_guest_file("/scratch/boincvm/f") == b"kept\n"


def test_revert_in_the_same_process(guest_image: Path, tmp_path: Path) -> None:
    with QemuBackend(make_spec(guest_image, tmp_path, "revert")) as vm:
        vm.power_on()
        vm.wait_for_tools()
        vm.run_program(["/bin/sh", "-c", "echo before > /scratch/boincvm/f"], timeout=30)
        vm.snapshot_create("a")
        vm.run_program(["/bin/sh", "-c", "echo after > /scratch/boincvm/f"], timeout=30)
        vm.snapshot_revert("a")
        assert vm.read_guest_file("/scratch/boincvm/f") == b"before\n"
        vm.snapshot_delete("a")
        assert vm.snapshot_list() == []
        pid = qemu_pid(vm)
    assert not vm.is_running() and gone(pid)
    assert not (tmp_path / "qmp.sock").exists()


OWNER = """
import sys, time
from pathlib import Path
from boincvm.hypervisor.qemu.backend import QemuBackend
from boincvm.image.descriptor import spec_for_image
vm = QemuBackend(spec_for_image(Path(sys.argv[1]), name="owner", workdir=Path(sys.argv[2])))
vm.power_on()
print(vm._popen.pid, flush=True)
time.sleep(600)
"""


def test_killing_the_owner_kills_qemu(guest_image: Path, tmp_path: Path) -> None:
    owner = proc.spawn([sys.executable, "-c", OWNER, guest_image, tmp_path], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        qemu = int(line)
        assert not gone(qemu, 0.5)
    finally:
        owner.kill()
        owner.wait(10)
    assert gone(qemu), "QEMU outlived its owner"


def test_a_silent_guest_gives_a_clear_bounded_error(tmp_path: Path) -> None:
    blank = tmp_path / "blank.qcow2"
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", blank, "16M"], timeout=30)
    spec = VmSpec(name="silent", workdir=tmp_path / "wd", image=blank, memory_mb=64, boot_timeout=4)
    with QemuBackend(spec) as vm:
        vm.power_on()
        t0 = time.monotonic()
        with pytest.raises(
            GuestToolsMissing, match="did not answer within 4 s; is qemu-guest-agent installed"
        ):
            vm.wait_for_tools()
        assert time.monotonic() - t0 < 10


def test_guest_tools_inspection(guest_image: Path, tmp_path: Path) -> None:
    from boincvm.findings import Severity
    from boincvm.image.inspect import check_guest_tools

    static = check_guest_tools(guest_image)
    assert [f.severity for f in static] == [Severity.INFO] and "qemu-ga found" in static[0].message
    booted = check_guest_tools(guest_image, boot=True, timeout=60)
    assert booted[-1].severity is Severity.INFO and "answered" in booted[-1].message
    blank = tmp_path / "blank.raw"
    with blank.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
    proc.run(["mkfs.ext4", "-q", "-F", blank], timeout=60)
    found = check_guest_tools(blank)
    assert found[0].severity is Severity.ERROR and "no qemu-ga" in found[0].message


def test_golden_start_sets_the_clock_and_a_broken_golden_is_set_aside(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boincvm.hypervisor.qemu import golden as qemu_golden

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def spec(n: int) -> VmSpec:
        s = make_spec(guest_image, tmp_path / f"vm{n}", f"golden{n}")
        return spec_for_image(guest_image, name=s.name, workdir=s.workdir, boot_timeout=60,
                              options={"golden": "yes"})  # fmt: skip

    with QemuBackend(spec(1)) as vm:  # builds the golden checkpoint, then starts from it
        vm.power_on()
        vm.wait_for_tools()
        timings = vm.start_timings
        assert 0 < timings["qemu"] <= timings["agent"] <= timings["ready"] < 30, timings
        assert vm.run_program(["/bin/date", "-s", "@1000000000"], timeout=30).exit_code == 0
        vm.resume()  # sets the guest clock again, as after a restore
        st = vm.run_program(["/bin/date", "+%s"], timeout=30)
        assert abs(int(st.stdout_tail) - time.time()) < 5
    built = [d for d in (tmp_path / "cache/boincvm/golden").iterdir() if not d.name.startswith(".")]
    assert len(built) == 1 and qemu_golden.find(built[0].name) is not None
    state = built[0] / qemu_golden.GOLDEN_STATE
    state.chmod(0o644)
    with state.open("r+b") as f:  # a torn or corrupted state file
        f.truncate(state.stat().st_size // 3)
    for n in (2, 3):  # the load fails once and marks it; afterwards jobs boot cold at once
        with QemuBackend(spec(n)) as vm:
            vm.power_on()
            vm.wait_for_tools()
            assert vm.run_program(["/bin/true"], timeout=30).exit_code == 0
        assert qemu_golden.is_broken(built[0].name) and qemu_golden.find(built[0].name) is None
    assert (built[0] / qemu_golden.GOLDEN_DISK).is_file()  # overlays of running jobs still need it


def test_jobs_map_the_golden_ram_privately_and_never_write_it(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boincvm.hypervisor.qemu import golden as qemu_golden

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def spec(n: int) -> VmSpec:
        s = make_spec(guest_image, tmp_path / f"vm{n}", f"cow{n}")
        return spec_for_image(guest_image, name=s.name, workdir=s.workdir, boot_timeout=60,
                              options={"golden": "yes"})  # fmt: skip

    with QemuBackend(spec(1)) as one:  # builds the golden checkpoint, then starts from it
        one.power_on()
        one.wait_for_tools()
        (built,) = [d for d in (tmp_path / "cache/boincvm/golden").iterdir() if not d.name.startswith(".")]
        ram = built / qemu_golden.GOLDEN_RAM
        before = hashlib.sha256(ram.read_bytes()).hexdigest()
        st = ram.stat()
        assert st.st_size == one.spec.memory_mb * 1024 * 1024
        assert st.st_blocks * 512 < st.st_size  # the zero pages are holes again
        # The stream holds the devices only: the RAM is the file.
        assert (built / qemu_golden.GOLDEN_STATE).stat().st_size < 4 * 1024 * 1024
        with QemuBackend(spec(2)) as two:
            two.power_on()
            two.wait_for_tools()
            for vm in (one, two):
                assert vm._popen is not None
                maps = Path(f"/proc/{vm._popen.pid}/maps").read_text()
                assert str(ram) in maps
            # What one guest writes the other does not see, and the file does not change.
            assert one.run_program(["/bin/sh", "-c", "echo one > /mark-cow"], timeout=30).exit_code == 0
            assert two.run_program(["/bin/sh", "-c", "test ! -e /mark-cow"], timeout=30).exit_code == 0
            used = built / qemu_golden.USED  # every start and checkpoint keeps it from pruning
            assert used.is_file()
            os.utime(used, (0, 0))
            one.snapshot_create("ck1")
            assert time.time() - used.stat().st_mtime < 600
            assert one.run_program(["/bin/sh", "-c", "rm /mark-cow"], timeout=30).exit_code == 0
            one.snapshot_revert("ck1")
            assert one.run_program(["/bin/cat", "/mark-cow"], timeout=30).stdout_tail.strip() == b"one"
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == before


def test_every_copy_of_an_image_shares_one_golden_checkpoint_which_outlives_the_first_copy(
    guest_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each BOINC data directory has its own copy of an app version's files. The golden
    checkpoint is keyed by their content, so all copies share one; its disk has its own
    base (a link or a copy), so deleting the project that built it breaks nothing."""
    from boincvm.hypervisor.qemu import golden as qemu_golden

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copies = []
    for n in (1, 2):
        d = tmp_path / f"project{n}"
        shutil.copytree(guest_image, d)
        os.utime(d / "vmlinux", ns=(n, n))  # another copy, another time
        copies.append(d)

    def spec(image: Path, n: int) -> VmSpec:
        return spec_for_image(image, name=f"share{n}", workdir=tmp_path / f"vm{n}", boot_timeout=60,
                              options={"golden": "yes"})  # fmt: skip

    with QemuBackend(spec(copies[0], 1)) as vm:
        vm.power_on()
        vm.wait_for_tools()
    (built,) = [d for d in (tmp_path / "cache/boincvm/golden").iterdir() if not d.name.startswith(".")]
    info = proc.run(["qemu-img", "info", "--output=json", built / "golden.qcow2"], timeout=60)
    disk = json.loads(info.text)
    assert disk["backing-filename"] == qemu_golden.GOLDEN_BASE, disk
    shutil.rmtree(copies[0])
    with QemuBackend(spec(copies[1], 2)) as vm:
        vm.power_on()
        vm.wait_for_tools()
        assert vm._popen is not None
        assert str(built / qemu_golden.GOLDEN_RAM) in Path(f"/proc/{vm._popen.pid}/maps").read_text()
        assert vm.run_program(["/bin/sh", "-c", "echo ok > /scratch/probe && cat /scratch/probe"],
                              timeout=30).stdout_tail.strip() == b"ok"  # fmt: skip
    assert [d.name for d in (tmp_path / "cache/boincvm/golden").iterdir() if not d.name.startswith(".")] == [
        built.name
    ]
