"""``boincvm package-image``: a base image -> a BOINC app version directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from boincvm.cli import console
from boincvm.cli.params import (
    DIRECTORY,
    EXISTING,
    EXISTING_FILE,
    app_option,
    backend_option,
    force_option,
    json_option,
)

if TYPE_CHECKING:
    from boincvm.appversion.model import AppVersion

# The core is imported inside the command, not here: the group imports this module to list
# the command, and ``boincvm --help`` stays instant (start-up speed, not an import circle).


@click.command("package-image", context_settings={"show_default": True})
@click.argument("image", type=EXISTING)
@app_option
@click.option("--version", default="1.00", help="App version (X.YY).")
@click.option(
    "--platform",
    default=None,
    help="BOINC platform [default: x86_64-pc-linux-gnu; windows_x86_64 with --wsl-wrapper].",
)
@click.option(
    "--plan-class",
    default=None,
    help="Plan class (the directory gets a __PLAN_CLASS suffix); writes its plan_class_spec.xml entry "
    "[default: none; wsl with --wsl-wrapper].",
)
@click.option(
    "--wsl-wrapper",
    type=EXISTING_FILE,
    help="BOINC's wsl_wrapper.exe: a Windows app version whose main program it is; the frozen "
    "wrapper goes in as main and runs inside WSL (its plan class entry carries <wsl/>).",
)
@click.option("--ncpus", type=int, default=None, help="The VM's CPUs (the plan class's min_ncpus).")
@click.option(
    "--require-kvm",
    is_flag=True,
    help="Never fall back to TCG: a host without usable KVM makes a temporary exit with a notice "
    "(<vm_accel_required/> in the job defaults; the plan class asks for --kvm-cpu-feature).",
)
@click.option(
    "--kvm-cpu-feature",
    type=click.Choice(["vmx", "svm"]),
    default="vmx",
    help="With --require-kvm: the CPU flag the plan class requires (vmx Intel, svm AMD; BOINC's "
    "feature list is an AND, so one vendor per plan class).",
)
@click.option("--memory-mb", type=int, help="Guest memory (default: what the image suggests, else 512).")
@click.option("--exec-dir", help="Working directory of jobs in the guest.")
@click.option("--initrd", type=EXISTING_FILE, help="With a kernel as IMAGE: its initramfs.")
@click.option("--kernel-cmdline", help="With a kernel as IMAGE: its command line.")
@click.option("--disk", type=EXISTING_FILE, help="With a kernel as IMAGE: a disk image to attach.")
@click.option(
    "--sign-key",
    type=EXISTING_FILE,
    help="code_sign_private: write FILE.sig for every file (the key itself is never copied).",
)
@backend_option("Written into the job defaults of every task.")
@click.option(
    "--wrapper",
    type=click.Choice(["frozen", "pyz"]),
    default="frozen",
    help="Main program: an ELF executable that needs no Python on the host (frozen, built once "
    "and cached), or a zip application for hosts with Python 3.11+ (pyz).",
)
@click.option(
    "--runtime",
    type=click.Choice(["bundled", "system"]),
    default=None,
    help="QEMU app versions: ship this machine's QEMU (bundled, the default) or use the host's (system).",
)
@click.option("--compress/--no-compress", default=True, help="Compress qcow2 clusters.")
@click.option(
    "--gzip/--no-gzip",
    "gzip_downloads",
    default=True,
    help="Mark files that compress well for BOINC's <gzip/> download compression.",
)
@click.option(
    "-o", "--output-dir", type=DIRECTORY, help="Directory to create [default: APP_VERSION_PLATFORM]."
)
@force_option
@json_option("Print a JSON summary on stdout.")
def command(
    image: Path,
    app_name: str,
    version: str,
    platform: str | None,
    plan_class: str | None,
    wsl_wrapper: Path | None,
    ncpus: int | None,
    require_kvm: bool,
    kvm_cpu_feature: str,
    memory_mb: int | None,
    exec_dir: str | None,
    initrd: Path | None,
    kernel_cmdline: str | None,
    disk: Path | None,
    sign_key: Path | None,
    backend_options: tuple[tuple[str, str], ...],
    wrapper: str,
    runtime: str | None,
    compress: bool,
    gzip_downloads: bool,
    output_dir: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Turn IMAGE (qcow2, raw, vmdk, a kernel, a build-image directory, or a VMware VM
    directory or .vmx with the snapshot boincvm-base) into an app version.

    Copy the result to apps/APP/VERSION/PLATFORM in the project and run update_versions.
    """
    from boincvm.appversion.build import package_image
    from boincvm.appversion.model import AppVersionRequest, RuntimeKind, WrapperKind
    from boincvm.appversion.wsl import default_target

    platform, plan_class = default_target(platform, plan_class, wsl=wsl_wrapper is not None)
    req = AppVersionRequest(
        image=image,
        app_name=app_name,
        version=version,
        output_dir=output_dir or Path(f"{app_name}_{version}_{_dirname(platform, plan_class)}"),
        platform=platform,
        plan_class=plan_class,
        memory_mb=memory_mb,
        exec_dir=exec_dir,
        compress=compress,
        gzip_downloads=gzip_downloads,
        force=force,
        initrd=initrd,
        kernel_cmdline=kernel_cmdline,
        disk=disk,
        sign_key=sign_key,
        backend_options=backend_options,
        wrapper=WrapperKind(wrapper),
        ncpus=ncpus,
        require_kvm=require_kvm,
        kvm_cpu_feature=kvm_cpu_feature,
        runtime=RuntimeKind(runtime) if runtime else None,
        wsl_wrapper=wsl_wrapper,
    )
    _report(package_image(req, lambda step, *_: console.info(step)), as_json=as_json)


def _dirname(platform: str, plan_class: str | None) -> str:
    """The app version's directory name in the project: ``PLATFORM[__PLAN_CLASS]``."""
    return f"{platform}__{plan_class}" if plan_class else platform


def _report(result: AppVersion, *, as_json: bool) -> None:
    """What was made and what to do next on stderr; the directory (or the summary) on stdout."""
    console.success(
        f"app version {result.app_name} {result.version} ({result.version_num}) in {result.directory}"
    )
    console.info(
        f"next: boincvm deploy PROJECT_DIR {result.directory} (as the project's owner) installs it as "
        f"apps/{result.app_name}/{result.version}/{_dirname(result.platform, result.plan_class)}/"
        + (", merges its plan class into plan_class_spec.xml" if result.plan_class else "")
        + " and runs bin/update_versions"
    )
    if as_json:
        console.out(json.dumps(result.as_dict(), indent=2))
    else:
        console.out(str(result.directory))
