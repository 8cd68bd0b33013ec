"""Guest packages: build them (RPM or tarball) and check packages someone else built."""

from __future__ import annotations

from boincvm.package.build import BuiltPackage, PackageFormat, PackageRequest, build_package
from boincvm.package.inspect import PackageInfo, check_package, inspect_package

__all__ = [
    "BuiltPackage",
    "PackageFormat",
    "PackageInfo",
    "PackageRequest",
    "build_package",
    "check_package",
    "inspect_package",
]
