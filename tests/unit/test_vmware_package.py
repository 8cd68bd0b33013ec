"""package-image on a VMware VM directory: what is collected, what is refused, what the app version says."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincvm.appversion.build import package_image
from boincvm.appversion.check import check_app_version
from boincvm.appversion.model import AppVersionRequest, parse_version_xml
from boincvm.errors import HypervisorError, InputError, PathEscapeError
from boincvm.findings import has_errors
from boincvm.hashing import md5_file
from boincvm.hypervisor.base import VmSpec
from boincvm.hypervisor.vmware.backend import BASE_DIR, VmwareBackend
from boincvm.hypervisor.vmware.files import COPY_MAX_BYTES, VmFile, collect_vm, rebuild_vm_dir
from boincvm.hypervisor.vmware.vmx import VmxFile, parse_vmsd
from boincvm.job import ImageFile, VmJob, load_job, parse_job
from boincvm.job.render import render_job
from tests.fakes.vmware_vm import VM_FILES, make_vm, write_vmsd
from tests.unit.test_vmware_backend import calls, install_fake, stop_everything


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    make_vm(tmp_path / "vm")
    return tmp_path / "vm"


def package(vm: Path, out: Path, **kw: object) -> Path:
    package_image(AppVersionRequest(image=vm, app_name="vmapp", version="1.00", output_dir=out, **kw))  # type: ignore[arg-type]
    return out


def defaults_of(av: Path) -> VmJob:
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    phys = next(f.physical_name for f in vx.files if f.logical_name == "vm_job_defaults.xml")
    return load_job(av / phys)


def test_collect_follows_every_reference(vm_dir: Path) -> None:
    vm = collect_vm(vm_dir / "base.vmx")
    assert {f.name: f.role for f in vm.files} == VM_FILES  # no vmware.log, no ISO
    assert vm.vmx.name == "base.vmx" and vm.memory_mb == 768 and vm.snapshot == "boincvm-base"
    assert collect_vm(vm_dir).files == vm.files  # the directory names the same VM


def test_parse_vmsd() -> None:
    text = (
        '.encoding = "UTF-8"\nsnapshot0.uid = "1"\nsnapshot0.filename = "x-Snapshot1.vmsn"\n'
        'snapshot0.displayName = "first"\nsnapshot0.disk0.fileName = "x.vmdk"\n'
        'snapshot0.disk0.node = "scsi0:0"\n'
        'snapshot1.displayName = "boincvm-base"\nsnapshot1.disk0.fileName = "x-000001.vmdk"\n'
        'snapshot.numSnapshots = "2"\n'
    )
    first, second = parse_vmsd(text)
    assert (first.display_name, first.state_file, first.disks) == ("first", "x-Snapshot1.vmsn", ("x.vmdk",))
    assert (second.display_name, second.state_file, second.disks) == (
        "boincvm-base",
        None,
        ("x-000001.vmdk",),
    )


def test_package_a_vm_directory(vm_dir: Path, tmp_path: Path) -> None:
    av = package(vm_dir, tmp_path / "av")
    vx, findings = parse_version_xml((av / "version.xml").read_bytes())
    assert findings == []
    by_logical = {f.logical_name: f for f in vx.files if f.logical_name}
    assert {n for n in by_logical if n.startswith("vmware_")} == {f"vmware_{n}" for n in VM_FILES}
    summary = {
        f["physical_name"]: f for f in json.loads((av / ".boincvm-app-version.json").read_text())["files"]
    }
    for name in VM_FILES:
        f = by_logical[f"vmware_{name}"]
        md5, size = md5_file(vm_dir / name)
        assert f.physical_name == f"vmapp_1.00_{md5[:12]}_{name}"
        assert md5_file(av / f.physical_name) == (md5, size)
        assert summary[f.physical_name]["md5"] == md5
    assert by_logical["vmware_base-s001.vmdk"].gzip  # mostly zeros: <gzip/> pays
    job = defaults_of(av)
    assert job.backend == "vmware" and job.vm_image == "vmware_base.vmx" and job.memory_mb == 768
    assert set(job.image_files) == {ImageFile(f"vmware_{n}", n) for n in VM_FILES}
    findings = check_app_version(av)
    assert not has_errors(findings), findings
    assert any("snapshot 'boincvm-base'" in f.message for f in findings)


def test_sparse_files_stay_sparse(vm_dir: Path, tmp_path: Path) -> None:
    av = package(vm_dir, tmp_path / "av")
    src = vm_dir / "data.vmdk"
    copy = next(av.glob("*_data.vmdk"))
    # The fixture writes holes; the test directory's file system (ext4 or tmpfs here) keeps them.
    assert src.stat().st_blocks * 512 < src.stat().st_size, "the source fixture is not sparse"
    assert copy.stat().st_blocks * 512 < copy.stat().st_size


def test_packaging_is_reproducible_and_force_replaces(vm_dir: Path, tmp_path: Path) -> None:
    a = sorted(p.name for p in package(vm_dir, tmp_path / "a").iterdir())
    b = sorted(p.name for p in package(vm_dir, tmp_path / "b").iterdir())
    assert a == b
    with pytest.raises(InputError, match="already exists"):
        package(vm_dir, tmp_path / "a")
    package(vm_dir, tmp_path / "a", force=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == a


def test_names_with_spaces_get_safe_physical_and_logical_names(tmp_path: Path) -> None:
    make_vm(tmp_path / "vm", "My VM")
    av = package(tmp_path / "vm" / "My VM.vmx", tmp_path / "av")
    job = defaults_of(av)
    assert job.vm_image == "vmware_My_VM.vmx"
    assert ImageFile("vmware_My_VM-s001.vmdk", "My VM-s001.vmdk") in job.image_files
    assert not any(" " in p.name for p in av.iterdir())
    assert not has_errors(check_app_version(av))


def _no_snapshot_file(vm: Path) -> None:
    (vm / "base.vmsd").unlink()


def _other_snapshot(vm: Path) -> None:
    write_vmsd(vm / "base.vmsd", [("before updates", "base-Snapshot1.vmsn", ["base.vmdk", "data.vmdk"])])


def _twice(vm: Path) -> None:
    write_vmsd(vm / "base.vmsd", [("boincvm-base", "base-Snapshot1.vmsn", ["base.vmdk"])] * 2)


def _lock(vm: Path) -> None:
    (vm / "base.vmx.lck").mkdir()
    (vm / "base.vmx.lck" / "M12345.lck").write_text("")


def _missing_extent(vm: Path) -> None:
    (vm / "base-s002.vmdk").unlink()


def _missing_snapshot_state(vm: Path) -> None:
    (vm / "base-Snapshot1.vmsn").unlink()


def _escaping_parent(vm: Path) -> None:
    (vm.parent / "other").mkdir()
    shutil.move(vm / "data.vmdk", vm.parent / "other" / "data.vmdk")
    _rewrite(vm / "base.vmsd", '"data.vmdk"', '"../other/data.vmdk"')
    _rewrite_embedded(
        vm / "data-000001.vmdk", 'parentFileNameHint="data.vmdk"', 'parentFileNameHint="../other/data.vmdk"'
    )


def _absolute_disk(vm: Path) -> None:
    _rewrite(vm / "base.vmx", '"data-000001.vmdk"', f'"{vm / "data-000001.vmdk"}"')


def _encrypted(vm: Path) -> None:
    _rewrite(
        vm / "base.vmx",
        'memsize = "768"',
        'memsize = "768"\nencryption.keySafe = "vmware:key/list/(pair/(null/vmware..."',
    )


def _independent(vm: Path) -> None:
    _rewrite(
        vm / "base.vmx",
        'scsi0:1.present = "TRUE"',
        'scsi0:1.present = "TRUE"\nscsi0:1.mode = "independent-persistent"',
    )


def _suspended(vm: Path) -> None:
    _rewrite(vm / "base.vmx", 'memsize = "768"', 'memsize = "768"\ncheckpoint.vmState = "base.vmss"')


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _rewrite_embedded(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    assert old.encode() in data
    patched = data.replace(old.encode(), new.encode())
    # keep the descriptor's sector size: trim padding NULs after the descriptor
    start = 512
    desc_end = patched.index(b"\0", start)
    grown = len(new) - len(old)
    patched = patched[:desc_end] + patched[desc_end + grown :]
    path.write_bytes(patched)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (_no_snapshot_file, InputError, "needs one named 'boincvm-base'"),
        (_other_snapshot, InputError, "no snapshot named 'boincvm-base'.*'before updates'"),
        (_twice, InputError, "2 snapshots are named"),
        (_lock, InputError, "in use.*base.vmx.lck"),
        (_missing_extent, InputError, "extent file base-s002.vmdk does not exist"),
        (_missing_snapshot_state, InputError, "base-Snapshot1.vmsn does not exist"),
        (_escaping_parent, PathEscapeError, "leaves the VM directory"),
        (_absolute_disk, PathEscapeError, "absolute path"),
        (_encrypted, InputError, "encrypted"),
        (_independent, InputError, "independent disks"),
        (_suspended, InputError, "suspended"),
    ],
)
def test_refusals_leave_nothing_behind(
    vm_dir: Path, tmp_path: Path, damage: object, error: type[Exception], message: str
) -> None:
    damage(vm_dir)  # type: ignore[operator]
    with pytest.raises(error, match=message) as caught:
        package(vm_dir, tmp_path / "av")
    assert caught.value.hint  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vm", *(["other"] if (tmp_path / "other").exists() else [])]
    )


def test_the_snapshot_hint_says_how_to_take_it(vm_dir: Path, tmp_path: Path) -> None:
    _no_snapshot_file(vm_dir)
    with pytest.raises(InputError) as caught:
        package(vm_dir, tmp_path / "av")
    assert 'vmrun -T ws snapshot "base.vmx" boincvm-base' in (caught.value.hint or "")
    assert "power the VM off" in (caught.value.hint or "")


def test_kernel_options_do_not_apply(vm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--kernel-cmdline does not apply"):
        package(vm_dir, tmp_path / "av", kernel_cmdline="quiet")


def test_validate_notices_a_missing_or_changed_file(vm_dir: Path, tmp_path: Path) -> None:
    av = package(vm_dir, tmp_path / "av")
    vsd = next(av.glob("*_base.vmsd"))
    vsd.write_text(vsd.read_text() + 'snapshot0.numClones = "1"\n')  # as VMware does to a base
    assert any("md5 or size differs" in f.message for f in check_app_version(av))
    vsd.write_text(vsd.read_text().replace("boincvm-base", "something"))
    assert any("no snapshot named 'boincvm-base'" in f.message for f in check_app_version(av))
    vsd.unlink()
    assert any("is not in the directory" in f.message for f in check_app_version(av))


def test_validate_wants_the_vm_files_listed(vm_dir: Path, tmp_path: Path) -> None:
    av = package(vm_dir, tmp_path / "av")
    defaults = next(av.glob("*_vm_job_defaults.xml"))
    job = load_job(defaults)
    defaults.write_text(render_job(VmJob(backend="vmware", vm_image=job.vm_image)))
    (av / ".boincvm-app-version.json").unlink()
    bad = [f for f in check_app_version(av) if f.severity == "error"]
    assert bad and "must list the VM's files" in bad[0].message


def test_image_file_round_trips_and_is_checked() -> None:
    job = VmJob(
        backend="vmware",
        vm_image="vmware_x.vmx",
        image_files=(ImageFile("vmware_x.vmx", "x.vmx"), ImageFile("vmware_x.vmdk", "disks/x.vmdk")),
    )
    again, findings = parse_job(render_job(job))
    assert findings == [] and again == job
    bad = VmJob(vm_image="vmware_y.vmx", image_files=(ImageFile("a/b", "../x.vmdk"),))
    _, findings = parse_job(render_job(bad))
    from boincvm.job import validate_job

    places = {f.place for f in validate_job(bad)}
    assert {"vm_job.image_file[0].open_name", "vm_job.image_file[0].file_name", "vm_job.vm_image"} <= places


def test_rebuild_copies_small_files_and_links_large_ones(vm_dir: Path, tmp_path: Path) -> None:
    files = {f.name: f.path for f in collect_vm(vm_dir).files}
    dest = tmp_path / "slot" / "base"
    how = rebuild_vm_dir(dest, files)
    for name, src in files.items():
        target = dest / name
        if src.stat().st_size < COPY_MAX_BYTES:
            assert how[name] == "copied" and not target.is_symlink()
        else:
            assert how[name] == "linked" and target.readlink() == src.resolve()
        assert target.read_bytes() == src.read_bytes()
    assert how["base.vmx"] == how["base.vmsd"] == how["base.vmdk"] == "copied"
    assert how["base-s001.vmdk"] == how["data.vmdk"] == "linked"
    assert rebuild_vm_dir(dest, files) == {}  # an existing directory is kept: clones refer to it
    assert [p.name for p in dest.parent.iterdir()] == ["base"]


def test_rebuild_is_all_or_nothing(vm_dir: Path, tmp_path: Path) -> None:
    files = {f.name: f.path for f in collect_vm(vm_dir).files}
    files["missing.vmdk"] = vm_dir / "missing.vmdk"
    with pytest.raises(InputError, match="missing.vmdk"):
        rebuild_vm_dir(tmp_path / "slot" / "base", files)
    with pytest.raises(PathEscapeError):
        rebuild_vm_dir(tmp_path / "slot" / "base", {"../x.vmx": vm_dir / "base.vmx"})
    assert list((tmp_path / "slot").iterdir()) == []


# -- the backend runs from the app version's files, rebuilt in the slot ----------------------------


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    install_fake(tmp_path / "bin", tmp_path / "state", monkeypatch)
    yield tmp_path / "state"
    stop_everything(tmp_path / "state")


def app_version_spec(av: Path, workdir: Path) -> VmSpec:
    """The VmSpec the wrapper makes in a slot: every image file resolved to the project's copy."""
    job = defaults_of(av)
    vx, _ = parse_version_xml((av / "version.xml").read_bytes())
    phys = {f.logical_name: av / f.physical_name for f in vx.files if f.logical_name}
    files = {f.file_name: phys[f.open_name] for f in job.image_files}
    assert job.vm_image is not None
    return VmSpec(
        name="task 1",
        workdir=workdir,
        image=phys[job.vm_image],
        image_files=files,
        boot_timeout=10,
        options={"pyvix": "off", "channel": "guestinfo"},
    )


def md5s(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: md5_file(p) for p in sorted(directory.iterdir())}


def test_backend_clones_from_the_rebuilt_base_and_never_writes_the_app_version(
    vm_dir: Path, tmp_path: Path, stand_in: Path
) -> None:
    av = package(vm_dir, tmp_path / "av")
    before = md5s(av)
    workdir = tmp_path / "slot" / "boincvm_vm"
    workdir.mkdir(parents=True)
    with VmwareBackend(app_version_spec(av, workdir)) as backend:
        backend.power_on()
        assert backend.is_running()
        base = workdir / BASE_DIR
        assert (base / "base.vmx").is_file() and not (base / "base.vmx").is_symlink()
        assert (base / "base-s001.vmdk").is_symlink() and (base / "data.vmdk").is_symlink()
        # the stand-in registered the clone in the slot's copy of the .vmsd, as Workstation does
        assert f'snapshot0.clone0 = "{backend.vmx}"' in (base / "base.vmsd").read_text()
        clone = VmxFile.load(backend.vmx)
        delta = backend.vmx.parent / (clone.get("scsi0:1.fileName") or "")
        assert f'parentFileNameHint="{base / "data.vmdk"}"' in delta.read_text()
        backend.power_off()
    assert "snapshot" not in commands(stand_in)  # the base snapshot was shipped
    assert md5s(av) == before


def test_backend_refuses_to_snapshot_an_app_version_vm(tmp_path: Path, stand_in: Path) -> None:
    vmx = make_vm(tmp_path / "vm", snapshot=None)  # as if the .vmsd had been left out
    files = {f.name: f.path for f in _files_without_snapshot(vmx)}
    workdir = tmp_path / "slot" / "boincvm_vm"
    workdir.mkdir(parents=True)
    spec = VmSpec(name="t", workdir=workdir, image=vmx, image_files=files, options={"pyvix": "off"})
    with VmwareBackend(spec) as backend, pytest.raises(InputError, match="has no snapshot 'boincvm-base'"):
        backend.power_on()
    assert {"snapshot", "clone"}.isdisjoint(commands(stand_in))
    assert commands(stand_in) == ["listSnapshots"]


def commands(state: Path) -> list[str]:
    """The vmrun command of each call (after the -T/-vp/-gu/-gp flags)."""
    out: list[str] = []
    if not (state / "calls.jsonl").exists():
        return out
    for argv in calls(state):
        while argv and argv[0] in ("-T", "-vp", "-gu", "-gp"):
            argv = argv[2:]
        out.append(argv[0])
    return out


def test_a_lost_app_version_file_fails_before_any_clone(vm_dir: Path, tmp_path: Path, stand_in: Path) -> None:
    av = package(vm_dir, tmp_path / "av")
    spec = app_version_spec(av, tmp_path / "slot")
    (tmp_path / "slot").mkdir()
    next(av.glob("*_base-s001.vmdk")).unlink()
    with VmwareBackend(spec) as backend, pytest.raises(InputError, match="base-s001.vmdk"):
        backend.power_on()
    assert not (tmp_path / "slot" / BASE_DIR).exists()
    assert "clone" not in commands(stand_in)


def test_the_stand_in_opens_the_linked_disks_as_vmware_does(
    vm_dir: Path, tmp_path: Path, stand_in: Path
) -> None:
    av = package(vm_dir, tmp_path / "av")
    spec = app_version_spec(av, tmp_path / "slot")
    rebuild_vm_dir(tmp_path / "slot" / BASE_DIR, spec.image_files)
    next(av.glob("*_base-s001.vmdk")).unlink()  # the link in the slot now dangles
    with VmwareBackend(spec) as backend, pytest.raises(HypervisorError, match="Cannot open the disk"):
        backend.power_on()


def _files_without_snapshot(vmx: Path) -> list[VmFile]:
    return [VmFile(p.name, p, "") for p in sorted(vmx.parent.iterdir()) if p.name != "vmware.log"]


def test_a_base_snapshot_of_another_name_is_a_backend_option(tmp_path: Path) -> None:
    vm = make_vm(tmp_path / "vm", snapshot="golden-2026")
    with pytest.raises(InputError, match="boincvm-base"):
        package(vm, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    av = package(vm, tmp_path / "av", backend_options=(("base_snapshot", "golden-2026"),))
    assert dict((o.name, o.value) for o in defaults_of(av).backend_options) == {
        "base_snapshot": "golden-2026"
    }
    findings = check_app_version(av)
    assert not has_errors(findings), findings
    assert any("snapshot 'golden-2026'" in f.message for f in findings)
