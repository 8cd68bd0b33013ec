#!/usr/bin/env bash
# Installs everything boincvm needs on a fresh Debian/Ubuntu machine: system packages,
# a virtual environment with boincvm and its test tools, and the bundled guest image.
# Sourced by scripts/example.sh and scripts/test.sh; safe to run again (it skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils   # the QEMU backend and image conversion
  rpm                          # rpmbuild for guest packages
  busybox-static cpio zstd lz4 e2fsprogs  # building the bundled example guest
  python3-venv python3-pip
  boinc-client                 # the real BOINC client, the judge in tests/integration/test_real_client.py
  openssl                      # cross-checks code signatures in the tests
  umoci mmdebstrap             # the container-image tests make real OCI images (no daemon, no registry);
                               # mmdebstrap also builds the bare Debian 11 host of tests/integration/test_bare_host.py
  podman skopeo runc           # benchmarks/bench_oci.py: BUDA's runtime side by side (runc: crun refuses cgroup v1 hosts)
  gcc                          # boincvm guest-api compiles libboinc_api.a; the guest API tests build BOINCified C programs
  binutils libpython3-dev      # PyInstaller (the frozen wrapper): objdump and strip, the shared libpython it bundles
  strace util-linux            # host-check tests: every exec of a refused job traced (no QEMU ran); setpriv runs the KVM probe as nobody
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/boincvm ]; then
  echo "bootstrap: creating .venv" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >&2
fi
.venv/bin/pip install -q -e '.[dev]' >&2
export PATH="$PWD/.venv/bin:$PATH"

# The bundled example guest (kernel + initramfs with busybox and qemu-guest-agent),
# built from Debian packages and cached by content.
boincvm build-image --recipe minimal >/dev/null

# The bare, older volunteer host (Debian 11 root file system with boinc-client 7.16, no python,
# no qemu) that tests/integration/test_bare_host.py runs the real client in; cached by its recipe.
python -m tests.bare_host >/dev/null
