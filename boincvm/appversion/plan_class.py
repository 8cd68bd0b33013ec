"""The app version's ``plan_class_spec.xml`` entry: the scheduler sends it only where it can run.

BOINC's scheduler reads ``plan_class_spec.xml`` in the project directory
(``sched/plan_class_spec.cpp``: ``PLAN_CLASS_SPECS::parse_specs`` wants a root
``<plan_classes>`` holding ``<plan_class>`` elements; ``PLAN_CLASS_SPEC::parse`` the tags
listed in :data:`KNOWN_TAGS`) and, for an app version with plan class NAME, the first
``<plan_class>`` whose ``<name>`` is NAME decides whether a host gets it. What the entry
says, from the app version's vm job defaults:

- ``<min_ncpus>``: the VM's CPUs (the host's usable CPUs must be at least that);
- ``<max_threads>`` with more than one CPU, so the scheduler counts the task as using that
  many CPUs (without ``<mem_usage_per_cpu_mb>``, which would add vboxwrapper's
  ``--memory_size_mb`` to the command line);
- ``<cpu_feature>``: where the job requires KVM, the CPU flag it needs. The scheduler's
  feature list is an AND (every listed flag must be among the host's ``p_features``);
  "vmx or svm" exists only as ``<vm_accel_required/>`` inside ``<virtualbox/>`` classes,
  so one entry asks for ``vmx`` (Intel) or ``svm`` (AMD), and a project that wants both
  ships the same files as a second app version with a second plan class;
- ``<min_core_client_version>``: the mmap channel (``api_version`` 7) needs a 7.0 client;
- ``<wsl/>`` for a Windows app version that runs through WSL: the scheduler then sends it
  only to hosts that report a usable WSL distro (``PLAN_CLASS_SPEC::check``).

Memory is not a plan-class field for CPU apps: the scheduler keeps a job from hosts with
less usable RAM through the workunit's ``rsc_memory_bound`` (``make-workunit`` sets it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from boincvm.errors import XmlError
from boincvm.findings import Finding, error, warning
from boincvm.job import DEFAULT_NCPUS, VmJob
from boincvm.render import render
from boincvm.xmlio import parse_xml, text_of

#: The file the scheduler reads (in the project directory).
FILE_NAME = "plan_class_spec.xml"
#: Where package-image puts the app version's entry: in the app version directory, with a
#: dot because ``update_versions`` makes every other file there an app-version file (one
#: every volunteer would download) and skips names that start with a dot.
ENTRY_NAME = "." + FILE_NAME
#: BOINC encodes client versions as major*10000 + minor*100 + release: 7.0.0.
MIN_CLIENT_VERSION = 70000
#: The CPU flags that say hardware virtualisation (Intel VT-x, AMD-V), as Linux names them.
KVM_CPU_FEATURES = ("vmx", "svm")

#: Every tag ``PLAN_CLASS_SPEC::parse`` reads (BOINC's sched/plan_class_spec.cpp); anything
#: else inside a ``<plan_class>`` the scheduler skips silently, so validate calls it an error.
KNOWN_TAGS = frozenset(
    """
    name min_core_client_version max_core_client_version gpu_type cuda cal opencl virtualbox
    wsl docker min_boinc_wsl_distro_version is64bit cpu_feature min_ncpus max_threads
    mem_usage_base_mb mem_usage_per_cpu_mb nthreads_cmdline projected_flops_scale os_regex
    cpu_vendor_regex cpu_model_regex host_summary_regex user_id infeasible_random
    min_os_version max_os_version min_android_version max_android_version min_libc_version
    project_prefs_tag project_prefs_regex project_prefs_default_true avg_ncpus cpu_frac
    min_gpu_ram_mb gpu_ram_used_mb gpu_peak_flops_scale ngpus min_gpu_peak_flops
    max_gpu_peak_flops min_driver_version max_driver_version gpu_utilization_tag
    need_ati_libs need_amd_libs without_opencl min_cal_target max_cal_target
    min_nvidia_compcap max_nvidia_compcap min_cuda_version max_cuda_version
    min_opencl_version max_opencl_version min_opencl_driver_revision
    max_opencl_driver_revision double_precision_fp min_metal_support gpu_type_regex
    min_vbox_version max_vbox_version exclude_vbox_version vm_accel_required min_wu_id
    max_wu_id min_batch max_batch
    """.split()
)
#: The tags whose value must be a number.
_NUMERIC = frozenset(
    {
        "min_ncpus",
        "max_threads",
        "min_core_client_version",
        "mem_usage_base_mb",
        "mem_usage_per_cpu_mb",
        "projected_flops_scale",
        "avg_ncpus",
    }
)


@dataclass(frozen=True)
class PlanClassSpec:
    """One ``<plan_class>`` entry, as boincvm writes and reads it."""

    name: str
    min_ncpus: int = DEFAULT_NCPUS
    max_threads: int | None = None
    cpu_features: tuple[str, ...] = ()
    min_core_client_version: int | None = MIN_CLIENT_VERSION
    wsl: bool = False

    @classmethod
    def for_job(
        cls, name: str, job: VmJob, *, kvm_cpu_feature: str = "vmx", wsl: bool = False
    ) -> PlanClassSpec:
        """The entry the app version's job defaults call for (``wsl``: it runs through WSL)."""
        ncpus = job.ncpus or DEFAULT_NCPUS
        return cls(
            name=name,
            min_ncpus=ncpus,
            max_threads=ncpus if ncpus > 1 else None,
            cpu_features=(kvm_cpu_feature,) if job.vm_accel_required else (),
            wsl=wsl,
        )

    def render(self) -> str:
        """The ``plan_class_spec.xml`` document holding this one entry."""
        return render("plan_class_spec.xml.j2", spec=self)


def _place(i: int) -> str:
    return f"{FILE_NAME}:plan_classes.plan_class[{i}]"


def check_plan_class_spec(
    data: bytes,
    *,
    plan_class: str | None,
    job: VmJob | None,
    in_app_version: bool = True,
    wsl: bool = False,
) -> list[Finding]:
    """Findings for a ``plan_class_spec.xml``: well-formed and safe, tags BOINC knows, an entry
    named ``plan_class`` (when the app version has one), values that agree with ``job``, and
    ``<wsl/>`` exactly when the app version runs through WSL (``wsl``).

    ``in_app_version`` False: a project's own (merged) file, judged on its own: no entry is
    expected by name, but every entry must parse (one bad entry makes the scheduler refuse
    every plan class: ``app_plan`` returns false for all of them after a parse error).
    """
    try:
        root = parse_xml(data, what=FILE_NAME)
    except XmlError as exc:
        return [error(FILE_NAME, exc.message, exc.hint)]
    if root.tag != "plan_classes":
        return [error(FILE_NAME, f"the root is <{root.tag}>, not <plan_classes>",
                      hint="the scheduler's parser starts at <plan_classes>")]  # fmt: skip
    entries, out = _entries(root)
    if not in_app_version:
        if not entries and not out:
            out.append(error(FILE_NAME, "has no <plan_class> entry"))
        return out
    if plan_class is None:
        out.append(
            warning(
                FILE_NAME,
                "the app version has no plan class, so the scheduler never uses this entry",
                hint="package with --plan-class NAME",
            )
        )
        return out
    if plan_class not in entries:
        have = ", ".join(sorted(entries)) or "none"
        out.append(
            error(
                FILE_NAME,
                f"no <plan_class> is named {plan_class!r}, the app version's plan class",
                hint=f"entries: {have}",
            )
        )
        return out
    i, pc = entries[plan_class]
    out += _check_wsl(pc, _place(i), wsl=wsl)
    if job is not None:
        out += _check_against_job(pc, job, _place(i))
    return out


def _check_wsl(pc: ET.Element, place: str, *, wsl: bool) -> list[Finding]:
    """``<wsl/>`` (or ``<wsl>N</wsl>`` with N not 0, as BOINC's ``parse_bool`` reads it) exactly
    when the app version runs through WSL."""
    asks = False
    for child in (c for c in pc if c.tag == "wsl"):
        value = text_of(child)
        try:
            asks = not value or int(value, 0) != 0
        except ValueError:
            return [error(f"{place}.wsl", f"{value!r} is not a boolean", hint="write <wsl/>")]
    if wsl and not asks:
        return [
            error(
                f"{place}.wsl",
                "the app version runs through WSL, but the entry does not ask for <wsl/>",
                hint="add <wsl/>: without it the scheduler sends the app version to hosts without WSL",
            )
        ]
    if asks and not wsl:
        return [
            error(
                f"{place}.wsl",
                "asks for WSL, but the app version does not run through it",
                hint="remove <wsl/>, or package with --wsl-wrapper",
            )
        ]
    return []


def _entries(root: ET.Element) -> tuple[dict[str, tuple[int, ET.Element]], list[Finding]]:
    """name -> (index, element) of the first ``<plan_class>`` of each name, with findings on
    every entry: a plan class with one name, tags the scheduler reads, numbers where it wants them."""
    out: list[Finding] = []
    entries: dict[str, tuple[int, ET.Element]] = {}
    for i, pc in enumerate(root):
        if pc.tag != "plan_class":
            out.append(
                error(f"{FILE_NAME}:plan_classes.{pc.tag}", "is not a <plan_class>; the scheduler skips it")
            )
            continue
        names = [text_of(c) for c in pc if c.tag == "name"]
        if len(names) != 1 or not names[0]:
            out.append(error(_place(i), "needs exactly one non-empty <name>"))
            continue
        out += _check_tags(pc, _place(i))
        entries.setdefault(names[0], (i, pc))
    return entries, out


def _check_tags(pc: ET.Element, place: str) -> list[Finding]:
    out: list[Finding] = []
    for child in pc:
        if child.tag not in KNOWN_TAGS:
            out.append(
                error(
                    f"{place}.{child.tag}",
                    "is not a tag BOINC's scheduler reads",
                    hint="see sched/plan_class_spec.cpp; a misspelt tag is silently ignored",
                )
            )
        elif child.tag in _NUMERIC:
            try:
                float(text_of(child))
            except ValueError:
                out.append(error(f"{place}.{child.tag}", f"{text_of(child)!r} is not a number"))
    return out


def _stated(pc: ET.Element, tag: str, *, absent: float, unreadable: float) -> float:
    """The number the entry's ``<tag>`` states: ``absent`` without the tag, ``unreadable``
    when it is not a number (:func:`_check_tags` reports that, so it is not judged twice)."""
    elem = pc.find(tag)
    if elem is None:
        return absent
    try:
        return float(text_of(elem))
    except ValueError:
        return unreadable


def _check_against_job(pc: ET.Element, job: VmJob, place: str) -> list[Finding]:
    out: list[Finding] = []
    ncpus = job.ncpus or DEFAULT_NCPUS
    if _stated(pc, "min_ncpus", absent=0.0, unreadable=ncpus) < ncpus:
        out.append(
            error(
                f"{place}.min_ncpus",
                f"lets hosts with fewer than the job's {ncpus} CPUs get it",
                hint=f"set <min_ncpus>{ncpus}</min_ncpus>",
            )
        )
    threads = _stated(pc, "max_threads", absent=1.0, unreadable=ncpus)
    if threads < ncpus:
        out.append(
            warning(
                f"{place}.max_threads",
                f"the scheduler will count {threads:g} CPU(s) for a VM with {ncpus}",
                hint=f"set <max_threads>{ncpus}</max_threads> so the client does not overcommit the host",
            )
        )
    features = {text_of(c).lower() for c in pc if c.tag == "cpu_feature"}
    if job.vm_accel_required and not features & set(KVM_CPU_FEATURES):
        out.append(
            error(
                f"{place}.cpu_feature",
                "the job requires KVM but the entry asks for neither vmx nor svm",
                hint="add <cpu_feature>vmx</cpu_feature> (Intel) or svm (AMD)",
            )
        )
    if features >= set(KVM_CPU_FEATURES):
        out.append(
            error(
                f"{place}.cpu_feature",
                "asks for both vmx and svm, which no CPU has (the list is an AND)",
                hint="one entry per vendor: vmx for Intel, svm for AMD",
            )
        )
    return out


__all__ = [
    "ENTRY_NAME",
    "FILE_NAME",
    "KNOWN_TAGS",
    "KVM_CPU_FEATURES",
    "PlanClassSpec",
    "check_plan_class_spec",
]
