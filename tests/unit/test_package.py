"""Guest packages: reproducible builds from examples/, and a corpus of hostile packages refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from boincvm.errors import InputError
from boincvm.findings import has_errors
from boincvm.package import PackageFormat, PackageRequest, build_package, check_package, inspect_package

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("fmt", [PackageFormat.RPM, PackageFormat.TAR])
def test_two_builds_of_the_same_directory_are_identical(tmp_path: Path, fmt: PackageFormat) -> None:
    # A copy with other times and modes: a fresh checkout must give the same bytes.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(EXAMPLES / "hello/program", copy)
    os.utime(copy / "bin/hello", (1_700_000_000, 1_700_000_000))
    req = PackageRequest(EXAMPLES / "hello/program", "hello", "1.0", entry_point="bin/hello", format=fmt)
    a = build_package(req, tmp_path / "a")
    b = build_package(
        PackageRequest(copy, "hello", "1.0", entry_point="bin/hello", format=fmt), tmp_path / "b"
    )
    assert a.md5 == b.md5
    assert a.path.name == b.path.name


def test_rpm_from_example_is_valid_and_fits_busybox(tmp_path: Path) -> None:
    built = build_package(PackageRequest(EXAMPLES / "longjob/program", "longjob", "2.1"), tmp_path)
    assert built.path.name == "longjob-2.1-1.noarch.rpm"
    info = inspect_package(built.path)
    assert info.payload == "gzip"
    assert info.arch == "noarch"
    paths = {e.path: e for e in info.entries}
    assert stat.S_IMODE(paths["/opt/longjob/bin/longjob"].mode) == 0o755
    findings = check_package(built.path)
    assert not has_errors(findings), findings


def test_tarball_lists_no_parent_directories(tmp_path: Path) -> None:
    built = build_package(
        PackageRequest(
            EXAMPLES / "hello/program", "hello", "1.0", entry_point="bin/hello", format=PackageFormat.TAR
        ),
        tmp_path,
    )
    with tarfile.open(built.path) as tar:
        names = tar.getnames()
        assert all(m.uid == 0 and m.mtime == tar.getmember(names[0]).mtime for m in tar)
    assert "opt" not in names and "usr/local/bin" not in names
    assert "opt/hello/bin/hello" in names and "usr/local/bin/hello" in names


@pytest.mark.parametrize(
    ("name", "match"),
    [("bad name", "package name"), ("ok", "version")],
)
def test_bad_names_are_refused(tmp_path: Path, name: str, match: str) -> None:
    version = "1.0" if name != "ok" else "1-0"
    with pytest.raises(InputError, match=match):
        build_package(PackageRequest(EXAMPLES / "hello/program", name, version), tmp_path)


def test_program_dir_with_escaping_symlink_is_refused(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.mkdir()
    (prog / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InputError, match="symlink"):
        build_package(PackageRequest(prog, "x", "1"), tmp_path / "out")


# -- the hostile corpus: tarballs written by hand, RPMs built with rpmbuild --------------------


def _tar(path: Path, members: list[tarfile.TarInfo], compress: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def _member(name: str, **kw: object) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(m, k, v)
    return m


HOSTILE_TARS = {
    "traversal": ([_member("opt/x/../../etc/cron.d/evil", size=3)], "leaves its directory"),
    "absolute": ([_member("/etc/shadow", size=3)], "absolute"),
    "outside": ([_member("etc/profile.d/evil.sh", size=3)], "outside the allowed prefixes"),
    "device": ([_member("opt/x/sda", type=tarfile.BLKTYPE)], "device"),
    "fifo": ([_member("opt/x/pipe", type=tarfile.FIFOTYPE)], "fifo"),
    "setuid": ([_member("opt/x/su", size=3, mode=0o4755)], "setuid"),
    "symlink-out": ([_member("opt/x/shadow", type=tarfile.SYMTYPE, linkname="/etc/shadow")], "symlink"),
    "symlink-relative-out": ([_member("opt/x/up", type=tarfile.SYMTYPE, linkname="../../etc")], "symlink"),
    "hardlink-out": ([_member("opt/x/h", type=tarfile.LNKTYPE, linkname="etc/shadow")], "hard link"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tarballs_are_refused(tmp_path: Path, case: str) -> None:
    members, message = HOSTILE_TARS[case]
    findings = check_package(_tar(tmp_path / f"{case}.tar.gz", members))
    assert has_errors(findings), findings
    assert any(message in f.message for f in findings), findings


def test_huge_installed_size_is_refused(tmp_path: Path) -> None:
    path = _tar(tmp_path / "big.tar.gz", [_member("opt/x/big", size=1000)])
    findings = check_package(path, max_installed=500)
    assert any("more than the limit" in f.message for f in findings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a package", "not a readable RPM"),
        (b"\xed\xab\xee\xdb\x03\x00\x00\x00" + b"\0" * 50, "not a readable RPM"),
    ],
)
def test_broken_rpms_are_refused_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.rpm"
    path.write_bytes(content)
    findings = check_package(path)
    assert has_errors(findings) and message in findings[0].message


def test_truncated_rpm_is_refused(tmp_path: Path) -> None:
    built = build_package(PackageRequest(EXAMPLES / "hello/program", "hello", "1.0"), tmp_path)
    truncated = tmp_path / "truncated.rpm"
    truncated.write_bytes(built.path.read_bytes()[:300])
    assert has_errors(check_package(truncated))


def test_not_a_package_at_all(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    findings = check_package(path)
    assert has_errors(findings) and "neither an RPM nor a tarball" in findings[0].message


def _rpm_with(tmp_path: Path, spec_install: str, files: str, defines: dict[str, str] | None = None) -> Path:
    """An RPM built with rpmbuild from a hand-written spec (what a careless or hostile packager makes)."""
    from boincvm import proc

    top = tmp_path / "top"
    spec = tmp_path / "evil.spec"
    spec.write_text(
        "Name: evil\nVersion: 1\nRelease: 1\nSummary: e\nLicense: none\nBuildArch: noarch\nAutoReqProv: no\n"
        "%global debug_package %{nil}\n%global __os_install_post %{nil}\n"
        f"%description\ne\n%install\n{spec_install}\n%files\n%defattr(-,root,root,-)\n{files}\n"
        "%post\necho owned > /etc/motd\n"
    )
    cmd = ["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}"]
    for k, v in (defines or {"_binary_payload": "w9.gzdio"}).items():
        cmd += ["--define", f"{k} {v}"]
    proc.run([*cmd, str(spec)], timeout=120)
    return next((top / "RPMS").rglob("*.rpm"))


def test_rpm_installing_outside_the_prefix_and_with_scriptlet(tmp_path: Path) -> None:
    rpm = _rpm_with(
        tmp_path,
        "mkdir -p %{buildroot}/etc/cron.d && echo x > %{buildroot}/etc/cron.d/evil",
        "/etc/cron.d/evil",
    )
    findings = check_package(rpm)
    assert any("outside the allowed prefixes" in f.message for f in findings)
    assert any("scriptlet" in f.message for f in findings)


def test_rpm_with_zstd_payload_names_the_fix(tmp_path: Path) -> None:
    rpm = _rpm_with(
        tmp_path,
        "mkdir -p %{buildroot}/opt/evil && echo x > %{buildroot}/opt/evil/f",
        "/opt/evil",
        {"_binary_payload": "w19.zstdio"},
    )
    findings = check_package(rpm)
    bad = [f for f in findings if "payload" in f.message]
    assert bad and bad[0].hint and "w9.gzdio" in bad[0].hint


def test_rpm_setuid_file(tmp_path: Path) -> None:
    rpm = _rpm_with(
        tmp_path,
        "mkdir -p %{buildroot}/opt/evil && echo x > %{buildroot}/opt/evil/su"
        " && chmod 4755 %{buildroot}/opt/evil/su",
        "/opt/evil",
    )
    assert any("setuid" in f.message for f in check_package(rpm))
    assert not any("setuid" in f.message for f in check_package(rpm, allow_setuid=True))


def test_build_rpm_refuses_odd_file_names(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.mkdir()
    (prog / "100%.txt").write_text("x")
    with pytest.raises(InputError, match="cannot be packaged"):
        build_package(PackageRequest(prog, "x", "1"), tmp_path / "out")
