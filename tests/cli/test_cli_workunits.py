"""The make-workunit, validate and package-image commands through click, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from boincvm.cli import cli
from tests.cli.conftest import RunFn


def test_help_lists_commands() -> None:
    r = CliRunner().invoke(cli, ["--help"], catch_exceptions=False)
    assert r.exit_code == 0
    for name in ("make-workunit", "validate", "package-image"):
        assert name in r.output


def test_make_workunit_then_validate(tmp_path: Path, run: RunFn) -> None:
    data = tmp_path / "in.txt"
    data.write_text("world")
    code, out, err = run(
        [
            "make-workunit",
            "--app",
            "hello",
            "--application",
            "/opt/hello/bin/hello",
            "--input",
            f"in={data}",
            "--output",
            "out:1000",
            "-o",
            str(tmp_path / "wu"),
            "--json",
        ]
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["count"] == 1
    assert "made 1 workunit" in err
    code, out, err = run(["validate", "--json", str(tmp_path / "wu")])
    assert code == 0, err
    assert json.loads(out)[0]["valid"] is True


def test_a_disk_bound_below_the_vm_memory_is_flagged_but_made(tmp_path: Path, run: RunFn) -> None:
    """Checkpoints hold what the guest wrote to its RAM; the client aborts a task whose slot
    outgrows rsc_disk_bound. Valid, so made, but said on stderr and in --json."""

    def make(out: str, *extra: str) -> tuple[int, dict[str, object], str]:
        argv = ["make-workunit", "--app", "hello", "--application", "/bin/true", "-o", str(tmp_path / out)]
        code, stdout, err = run([*argv, "--json", *extra])
        return code, json.loads(stdout) if code == 0 else {}, err

    code, summary, err = make("wu", "--memory-mb", "2048")  # the default bound: 1e9 bytes
    assert code == 0, err
    warnings = summary["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1, warnings
    assert "rsc_disk_bound (1e+09 bytes) is below the VM's memory (2048 MiB)" in warnings[0]
    assert f"--disk-bound {(2 * 2048 + 256) * 2**20} leaves room" in warnings[0]
    assert "note: rsc_disk_bound" in err and (tmp_path / "wu").is_dir()
    code, summary, err = make("wu2", "--memory-mb", "2048", "--disk-bound", "5e9")
    assert code == 0 and summary["warnings"] == [] and "note:" not in err, err
    code, summary, err = make("wu3")  # the default memory, 512 MiB, fits the default bound
    assert code == 0 and summary["warnings"] == [], err


def test_missing_input_is_one_sentence_and_exit_3(tmp_path: Path, run: RunFn) -> None:
    code, out, err = run(
        [
            "make-workunit",
            "--app",
            "hello",
            "--application",
            "/x",
            "--input",
            f"in={tmp_path / 'nope'}",
            "--output",
            "out:10",
            "-o",
            str(tmp_path / "wu"),
        ]
    )
    assert code == 3
    assert "error: workunit: in: input file" in err
    assert "hint:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "wu").exists()


def test_bad_output_spec_is_a_usage_error(tmp_path: Path, run: RunFn) -> None:
    code, _, err = run(
        ["make-workunit", "--app", "a", "--application", "/x", "--output", "out", "-o", str(tmp_path / "w")]
    )
    assert code == 2
    assert "MAX_NBYTES" in err


def test_validate_invalid_job_exits_4_with_places(tmp_path: Path, run: RunFn) -> None:
    job = tmp_path / "job.xml"
    job.write_text(
        "<vm_job><task><application></application></task><output_file><open_name>o</open_name>"
        "</output_file></vm_job>"
    )
    code, out, err = run(["validate", "--json", str(job)])
    assert code == 4
    report = json.loads(out)[0]
    places = [f["place"] for f in report["findings"]]
    assert "vm_job.task.application" in places
    assert "vm_job.output_file[0].max_nbytes" in places


def test_validate_refuses_entity_bomb(tmp_path: Path, run: RunFn) -> None:
    job = tmp_path / "job.xml"
    job.write_text(
        '<!DOCTYPE v [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><vm_job><backend>&b;</backend></vm_job>'
    )
    code, _, err = run(["validate", str(job)])
    assert code == 4
    assert "DTD" in err


def test_validate_missing_path_exits_3(tmp_path: Path, run: RunFn) -> None:
    code, _, err = run(["validate", str(tmp_path / "nothing")])
    assert code == 3
    assert "does not exist" in err


def test_batch_from_csv(tmp_path: Path, run: RunFn) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("seed\n1\n2\n3\n")
    code, out, err = run(
        [
            "make-workunit",
            "--app",
            "sim",
            "--application",
            "/opt/sim",
            "--command-line",
            "--seed {{ seed }}",
            "--name",
            "sim_{{ seed }}",
            "--batch",
            str(rows),
            "--output",
            "out:10",
            "-o",
            str(tmp_path / "wu"),
        ]
    )
    assert code == 0, err
    assert out.strip() == str(tmp_path / "wu")
    lines = (tmp_path / "wu/jobs.txt").read_text().splitlines()
    assert [ln.split()[1] for ln in lines] == ["sim_1", "sim_2", "sim_3"]


def test_package_image_of_a_sparse_raw_disk(tmp_path: Path, run: RunFn) -> None:
    import subprocess

    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "1G"], check=True, capture_output=True)
    code, out, err = run(["package-image", str(img), "--app", "hello", "-o", str(tmp_path / "av"), "--json"])
    assert code == 0, err
    summary = json.loads(out)
    disk = next(f for f in summary["files"] if f["logical_name"] == "vm_disk.qcow2")
    assert disk["nbytes"] < 10 * 1024 * 1024  # the 1 GiB of holes was not inflated
    code, out, err = run(["validate", "--json", str(tmp_path / "av")])
    assert code == 0, err
    vx = (tmp_path / "av/version.xml").read_text()
    assert "<api_version>7.20.0</api_version>" in vx
    assert "<is_wrapper/>" in vx


def test_package_image_refuses_a_non_image(tmp_path: Path, run: RunFn) -> None:
    bogus = tmp_path / "x.qcow2"
    bogus.write_bytes(b"QFI\xfb" + b"\0" * 100)
    code, _, err = run(["package-image", str(bogus), "--app", "hello", "-o", str(tmp_path / "av")])
    assert code in (3, 5)
    assert "Traceback" not in err
    assert not (tmp_path / "av").exists()


def test_package_image_from_kernel_initrd_and_disk(tmp_path: Path, run: RunFn, guest_image: Path) -> None:
    import json as _json

    from boincvm.image.descriptor import ImageDescriptor

    desc = ImageDescriptor.load(guest_image)
    assert desc.kernel and desc.initrd and desc.disk
    code, out, err = run(
        [
            "package-image",
            str(guest_image / desc.kernel),
            "--initrd",
            str(guest_image / desc.initrd),
            "--disk",
            str(guest_image / desc.disk),
            "--kernel-cmdline",
            desc.kernel_cmdline,
            "--app",
            "k",
            "-o",
            str(tmp_path / "av"),
            "--json",
        ]
    )
    assert code == 0, err
    logical = {f["logical_name"] for f in _json.loads(out)["files"]}
    assert {"vm_kernel", "vm_initrd", "vm_disk.qcow2", "vm_job_defaults.xml"} <= logical
    code, _, err = run(["validate", str(tmp_path / "av")])
    assert code == 0, err
    defaults = next((tmp_path / "av").glob("*vm_job_defaults.xml")).read_text()
    assert "<vm_kernel>vm_kernel</vm_kernel>" in defaults and desc.kernel_cmdline.split()[0] in defaults


def test_package_image_initrd_without_kernel_is_refused(tmp_path: Path, run: RunFn) -> None:
    import subprocess

    img = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "8M"], check=True, capture_output=True)
    (tmp_path / "initrd").write_bytes(b"0707")
    code, _, err = run(
        [
            "package-image",
            str(img),
            "--initrd",
            str(tmp_path / "initrd"),
            "--app",
            "k",
            "-o",
            str(tmp_path / "av"),
        ]
    )
    assert code == 3
    assert "not a kernel" in err
    assert not (tmp_path / "av").exists()


def test_keys_and_signed_app_version(tmp_path: Path, run: RunFn) -> None:
    import subprocess

    code, out, err = run(["keys", "create", str(tmp_path / "keys")])
    assert code == 0, err
    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "16M"], check=True, capture_output=True)
    code, _, err = run(
        [
            "package-image",
            str(img),
            "--app",
            "s",
            "-o",
            str(tmp_path / "av"),
            "--sign-key",
            str(tmp_path / "keys/code_sign_private"),
        ]
    )
    assert code == 0, err
    av = tmp_path / "av"
    signed = sorted(p.name for p in av.glob("*.sig"))
    # The launcher, the static wrapper, the wrapper's runtime, disk, QEMU runtime, job defaults.
    assert len(signed) == 6
    assert [n for n in signed if n.endswith("_qemu_runtime.tar.xz.sig")]
    assert not list(av.glob("code_sign*"))
    for sig in av.glob("*.sig"):
        target = av / sig.name[: -len(".sig")]
        code, _, err = run(["keys", "verify", str(target), "--key", str(tmp_path / "keys/code_sign_public")])
        assert code == 0, err
    target.write_bytes(b"changed")
    code, _, err = run(["keys", "verify", str(target), "--key", str(tmp_path / "keys/code_sign_public")])
    assert code == 4
    assert "does not match" in err


def test_validate_checks_the_bundled_runtime(tmp_path: Path, run: RunFn) -> None:
    import subprocess

    code, _, err = run(["keys", "create", str(tmp_path / "keys")])
    assert code == 0, err
    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "16M"], check=True, capture_output=True)
    key = str(tmp_path / "keys/code_sign_private")
    code, _, err = run(
        ["package-image", str(img), "--app", "s", "-o", str(tmp_path / "av"), "--sign-key", key]
    )
    assert code == 0, err
    av = tmp_path / "av"
    (archive,) = av.glob("*_qemu_runtime.tar.xz")
    code, _, err = run(["validate", str(av)])
    assert code == 0, err
    sig = av / f"{archive.name}.sig"
    sig.rename(tmp_path / "saved.sig")
    code, out, err = run(["validate", str(av)])
    assert code != 0 and "QEMU runtime is not signed" in out + err and "Traceback" not in err
    (tmp_path / "saved.sig").rename(sig)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\0" * 4096
    archive.write_bytes(bytes(data))
    code, out, err = run(["validate", str(av)])
    assert code != 0 and "QEMU runtime archive is damaged" in out + err and "Traceback" not in err
    # --runtime system: no runtime file, no runtime option.
    code, _, err = run(
        ["package-image", str(img), "--app", "s", "-o", str(tmp_path / "sys"), "--runtime", "system"]
    )
    assert code == 0, err
    assert not list((tmp_path / "sys").glob("*qemu_runtime*"))
    assert "runtime" not in next((tmp_path / "sys").glob("*_vm_job_defaults.xml")).read_text()


def test_backend_options_on_the_command_line(tmp_path: Path, run: RunFn) -> None:
    import subprocess

    from boincvm.job import BackendOption, load_job

    base = ["make-workunit", "--app", "a", "--application", "/x", "--output", "out:10"]
    code, _, err = run([*base, "--backend-option", "machine=pc", "-o", str(tmp_path / "wu")])
    assert code == 0, err
    jobs = list((tmp_path / "wu/download").glob("a_*.xml"))
    assert jobs and load_job(jobs[0]).backend_options == (BackendOption("machine", "pc"),)
    code, _, err = run([*base, "--backend-option", "machine=isapc", "-o", str(tmp_path / "bad")])
    assert code in (3, 4) and "machine: must be one of pc, q35, microvm" in err, err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
    code, _, err = run([*base, "--backend-option", "machine", "-o", str(tmp_path / "bad")])
    assert code == 2 and "is not NAME=VALUE" in err

    img = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "64M"], check=True, capture_output=True)
    package = ["package-image", str(img), "--app", "hello"]
    code, _, err = run([*package, "--backend-option", "golden=sometimes", "-o", str(tmp_path / "av0")])
    assert code == 3 and "options.golden: must be one of auto, yes, no" in err, err
    assert not (tmp_path / "av0").exists()
    code, _, err = run([*package, "--backend-option", "golden=no", "-o", str(tmp_path / "av")])
    assert code == 0, err
    defaults = next((tmp_path / "av").glob("*vm_job_defaults.xml"))
    # package-image adds the bundled QEMU runtime after the options it was given.
    assert load_job(defaults).backend_options == (
        BackendOption("golden", "no"),
        BackendOption("runtime", "qemu_runtime.tar.xz"),
    )


def test_make_workunit_with_app_level_checkpoints(tmp_path: Path, run: RunFn) -> None:
    args = ["make-workunit", "--app", "hello", "--application", "/bin/prog", "--output", "out:1000"]
    code, _, err = run(
        [*args, "--checkpoint-mode", "app", "--checkpoint-file", "state", "-o", str(tmp_path / "wu")]
    )
    assert code == 0, err
    (job,) = (tmp_path / "wu/download").glob("hello_*.xml")  # the job file, named by its content
    text = job.read_text()
    assert (
        "<checkpoint_mode>app</checkpoint_mode>" in text
        and "<checkpoint_file>state</checkpoint_file>" in text
    )
    code, _, err = run([*args, "--checkpoint-file", "../escape", "-o", str(tmp_path / "wu2")])
    assert code == 3, err  # bad input, as any other bad job option
    assert "checkpoint_file[0]" in err and "leaves its directory" in err
    assert "Traceback" not in err
