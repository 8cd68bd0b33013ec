"""Shell scripts that install and remove a guest package through the guest tools.

They run under any POSIX shell, busybox ash included. RPMs are installed with ``rpm -i``:
the real rpm (with ``--nodeps``, keeping its database so ``rpm -e`` removes the package)
or busybox's (no database, no scriptlets: the file list, taken with ``rpm -qpl`` before
installing, is what removal deletes). Tarballs are unpacked at ``/`` and removed by their
member list. The package's file list is kept beside it in the job directory.
"""

from __future__ import annotations

import shlex

from boincvm.job import PackageKind


def package_guest_path(kind: PackageKind, exec_dir: str) -> str:
    """Where the wrapper puts the package in the guest."""
    return f"{exec_dir.rstrip('/')}/.boincvm-package{'.rpm' if kind is PackageKind.RPM else '.tar.gz'}"


def _state(exec_dir: str) -> tuple[str, str]:
    base = f"{exec_dir.rstrip('/')}/.boincvm-package"
    return f"{base}.files", f"{base}.name"


def install_script(kind: PackageKind, guest_pkg: str) -> str:
    """A script that installs ``guest_pkg`` and records what to remove later."""
    exec_dir = guest_pkg.rsplit("/", 1)[0] or "/"
    files, name = _state(exec_dir)
    pkg, f, n = shlex.quote(guest_pkg), shlex.quote(files), shlex.quote(name)
    if kind is PackageKind.RPM:
        return (
            "set -e\n"
            f"rpm -qpl {pkg} > {f}\n"
            # busybox rpm does not create the parents of a file whose directory the package
            # does not list (e.g. /usr/local/bin for an entry-point link).
            f'while IFS= read -r p; do mkdir -p "$(dirname "$p")"; done < {f}\n'
            "if rpm --version 2>/dev/null | grep -q 'RPM version'; then\n"
            f"  rpm -qp --qf '%{{NAME}}' {pkg} > {n}\n"
            f"  rpm -i --nodeps --replacepkgs {pkg}\n"
            "else\n"
            f"  rpm -i {pkg}\n"
            "fi\n"
        )
    return f"set -e\ntar -tzf {pkg} > {f}\ntar -xzf {pkg} -C /\n"


def uninstall_script(kind: PackageKind, exec_dir: str) -> str:
    """A script that removes what :func:`install_script` installed (files, then empty directories)."""
    files, name = _state(exec_dir)
    f, n = shlex.quote(files), shlex.quote(name)
    remove_files = (
        f"[ -f {f} ] || exit 0\n"
        f"while IFS= read -r p; do p=/${{p#/}}; p=${{p%/}}; "
        '[ -d "$p" ] && [ ! -L "$p" ] && continue; rm -f "$p"; done < ' + f + "\n"
        f"sort -r {f} | while IFS= read -r p; do p=/${{p#/}}; p=${{p%/}}; "
        '[ -d "$p" ] && [ ! -L "$p" ] && rmdir "$p" 2>/dev/null; done; true\n'
    )
    if kind is PackageKind.RPM:
        return (
            f"if [ -s {n} ] && rpm --version 2>/dev/null | grep -q 'RPM version'; then\n"
            f'  rpm -e --nodeps "$(cat {n})" || true\n'
            "fi\n" + remove_files
        )
    return remove_files
