"""``package-image --plan-class`` writes the plan_class_spec.xml entry; ``validate`` checks it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from boincvm.appversion.plan_class import KNOWN_TAGS
from boincvm.job import load_job
from boincvm.xmlio import parse_xml, text_of
from tests.cli.conftest import RunFn


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("img") / "base.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "64M"], check=True, capture_output=True)
    return img


def _package(run: RunFn, image: Path, out: Path, *extra: str) -> dict[str, object]:
    args = ["package-image", str(image), "--app", "hello", "--wrapper", "pyz", "-o", str(out), "--json"]
    code, stdout, err = run([*args, *extra])
    assert code == 0, err
    summary: dict[str, object] = json.loads(stdout)
    return summary


def _entry(out: Path) -> dict[str, list[str]]:
    root = parse_xml((out / ".plan_class_spec.xml").read_bytes(), what="test")
    assert root.tag == "plan_classes" and len(root) == 1 and root[0].tag == "plan_class"
    entry: dict[str, list[str]] = {}
    for child in root[0]:
        entry.setdefault(child.tag, []).append(text_of(child))
    return entry


def _validate(run: RunFn, path: Path) -> tuple[int, list[dict[str, str]], str]:
    code, out, err = run(["validate", "--json", str(path)])
    reports = json.loads(out) if out.strip() else [{"findings": []}]
    findings: list[dict[str, str]] = reports[0]["findings"]
    return code, findings, err


def test_kvm_plan_class_entry_and_validate(tmp_path: Path, run: RunFn, base_image: Path) -> None:
    out = tmp_path / "av"
    summary = _package(
        run, base_image, out, "--plan-class", "vm_kvm", "--ncpus", "2", "--memory-mb", "768", "--require-kvm"
    )
    assert summary["plan_class"] == "vm_kvm"
    entry = _entry(out)
    assert entry == {
        "name": ["vm_kvm"],
        "min_core_client_version": ["70000"],
        "min_ncpus": ["2"],
        "max_threads": ["2"],
        "cpu_feature": ["vmx"],
    }
    assert set(entry) <= KNOWN_TAGS
    defaults = load_job(next(out.glob("*vm_job_defaults.xml")))
    assert defaults.vm_accel_required is True and defaults.ncpus == 2 and defaults.memory_mb == 768
    # The entry is not an app-version file: the project merges it into its own file.
    assert "plan_class_spec" not in (out / "version.xml").read_text()
    code, findings, err = _validate(run, out)
    assert code == 0, (findings, err)
    assert not [f for f in findings if f["severity"] == "error"]
    # Under its scheduler name it would become an app-version file (update_versions takes every
    # file but dot-names): validate says so.
    (out / ".plan_class_spec.xml").rename(out / "plan_class_spec.xml")
    code, findings, err = _validate(run, out)
    assert code == 4 and any("update_versions would ship it" in f["message"] for f in findings), findings


def test_plain_plan_class_has_no_cpu_feature_and_svm_is_chosen(
    tmp_path: Path, run: RunFn, base_image: Path
) -> None:
    _package(run, base_image, tmp_path / "plain", "--plan-class", "vm")
    assert _entry(tmp_path / "plain") == {
        "name": ["vm"],
        "min_core_client_version": ["70000"],
        "min_ncpus": ["1"],
    }
    _package(
        run,
        base_image,
        tmp_path / "amd",
        "--plan-class",
        "vm_svm",
        "--require-kvm",
        "--kvm-cpu-feature",
        "svm",
    )
    assert _entry(tmp_path / "amd")["cpu_feature"] == ["svm"]
    # Without a plan class there is no entry to write.
    _package(run, base_image, tmp_path / "none")
    assert not (tmp_path / "none/.plan_class_spec.xml").exists()


def _broken(tmp_path: Path, run: RunFn, base_image: Path, text: str) -> tuple[int, list[dict[str, str]], str]:
    out = tmp_path / "av"
    if not out.exists():
        _package(run, base_image, out, "--plan-class", "vm_kvm", "--ncpus", "2", "--require-kvm")
    (out / ".plan_class_spec.xml").write_text(text)
    return _validate(run, out)


@pytest.mark.parametrize(
    ("text", "place", "words"),
    [
        (
            '<!DOCTYPE p [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            "<plan_classes><plan_class><name>&b;</name></plan_class></plan_classes>",
            "plan_class_spec.xml",
            "DTD",
        ),
        ("<plan_classes><plan_class><name>vm_kvm</name>", "plan_class_spec.xml", "not well-formed"),
        (
            "<plan_classes><plan_class><name>other</name><min_ncpus>2</min_ncpus>"
            "<cpu_feature>vmx</cpu_feature></plan_class></plan_classes>",
            "plan_class_spec.xml",
            "no <plan_class> is named 'vm_kvm'",
        ),
        (
            "<plan_classes><plan_class><name>vm_kvm</name><min_ncpus>2</min_ncpus><cpu_feature>vmx</cpu_feature>"
            "<min_ram_mb>512</min_ram_mb></plan_class></plan_classes>",
            "plan_class_spec.xml:plan_classes.plan_class[0].min_ram_mb",
            "not a tag BOINC's scheduler reads",
        ),
        (
            "<plan_classes><plan_class><name>vm_kvm</name><min_ncpus>1</min_ncpus>"
            "<cpu_feature>vmx</cpu_feature></plan_class></plan_classes>",
            "plan_class_spec.xml:plan_classes.plan_class[0].min_ncpus",
            "fewer than the job's 2 CPUs",
        ),
        (
            "<plan_classes><plan_class><name>vm_kvm</name><min_ncpus>2</min_ncpus></plan_class></plan_classes>",
            "plan_class_spec.xml:plan_classes.plan_class[0].cpu_feature",
            "requires KVM",
        ),
        (
            "<plan_classes><plan_class><name>vm_kvm</name><min_ncpus>two</min_ncpus>"
            "<cpu_feature>vmx</cpu_feature></plan_class></plan_classes>",
            "plan_class_spec.xml:plan_classes.plan_class[0].min_ncpus",
            "is not a number",
        ),
        ("<plan_class><name>vm_kvm</name></plan_class>", "plan_class_spec.xml", "not <plan_classes>"),
    ],
    ids=["entity-bomb", "malformed", "wrong-name", "unknown-tag", "too-few-cpus", "no-vmx", "nan", "root"],
)
def test_validate_refuses_a_broken_entry(
    tmp_path: Path, run: RunFn, base_image: Path, text: str, place: str, words: str
) -> None:
    code, findings, err = _broken(tmp_path, run, base_image, text)
    assert code == 4, (findings, err)
    assert "Traceback" not in err
    hits = [f for f in findings if f["severity"] == "error" and f["place"] == place and words in f["message"]]
    assert hits, findings


def test_validate_a_projects_merged_file(tmp_path: Path, run: RunFn, base_image: Path) -> None:
    out = tmp_path / "av"
    _package(run, base_image, out, "--plan-class", "vm_kvm", "--require-kvm")
    ours = (out / ".plan_class_spec.xml").read_text()
    entry = ours[ours.index("<plan_class>") : ours.index("</plan_classes>")]
    project = "<plan_classes>\n<plan_class><name>mt</name><max_threads>4</max_threads></plan_class>\n"
    merged = tmp_path / "project" / "plan_class_spec.xml"
    merged.parent.mkdir()
    merged.write_text(project + entry + "</plan_classes>\n")
    code, findings, err = _validate(run, merged)
    assert code == 0, (findings, err)
    # One misspelt tag anywhere makes the scheduler ignore it silently: refused with its place.
    merged.write_text(project.replace("max_threads>", "max_thread>") + entry + "</plan_classes>\n")
    code, findings, err = _validate(run, merged)
    assert code == 4 and "Traceback" not in err
    assert [f["place"] for f in findings] == ["plan_class_spec.xml:plan_classes.plan_class[0].max_thread"]


def test_make_workunit_require_kvm(tmp_path: Path, run: RunFn) -> None:
    base = ["make-workunit", "--app", "a", "--application", "/x", "--output", "out:10"]
    code, _, err = run([*base, "--require-kvm", "-o", str(tmp_path / "kvm")])
    assert code == 0, err
    (job,) = (tmp_path / "kvm/download").glob("a_*.xml")
    assert load_job(job).vm_accel_required is True
    code, _, err = run([*base, "-o", str(tmp_path / "plain")])
    assert code == 0, err
    (job,) = (tmp_path / "plain/download").glob("a_*.xml")
    assert load_job(job).vm_accel_required is None


def test_too_few_threads_is_a_warning(tmp_path: Path, run: RunFn, base_image: Path) -> None:
    out = tmp_path / "av"
    _package(run, base_image, out, "--plan-class", "vm4", "--ncpus", "4")
    (out / ".plan_class_spec.xml").write_text(
        "<plan_classes><plan_class><name>vm4</name><min_ncpus>4</min_ncpus></plan_class></plan_classes>"
    )
    code, findings, err = _validate(run, out)
    assert code == 0, (findings, err)  # a warning: the host is overcommitted, the task still runs
    (hit,) = [f for f in findings if f["place"].endswith(".max_threads")]
    assert hit["severity"] == "warning" and "count 1 CPU(s) for a VM with 4" in hit["message"]
