#!/usr/bin/env bash
# Installs everything boincvm needs on a fresh Debian/Ubuntu machine: system packages,
# a virtual environment with boincvm and its test tools, and the bundled guest image.
# Sourced by scripts/example.sh (BOOTSTRAP_FOR=example: only what the example needs) and
# scripts/test.sh (everything the tests need, BOINC's server included); safe to run again
# (it skips what is there). apt's and pip's output goes to a log, shown only if they fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BOOTSTRAP_FOR=${BOOTSTRAP_FOR:-tests}

APT_PACKAGES=(
  qemu-system-x86 qemu-utils   # the QEMU backend and image conversion
  rpm                          # rpmbuild for guest packages
  busybox-static cpio zstd lz4 e2fsprogs  # building the bundled example guest
  python3-venv python3-pip
  binutils libpython3-dev      # PyInstaller (the frozen wrapper): objdump and strip, the shared libpython it bundles
  util-linux                   # fallocate --dig-holes keeps the golden RAM file sparse
)
TEST_PACKAGES=(
  boinc-client                 # the real BOINC client, the judge in tests/integration/test_real_client.py
  openssl                      # cross-checks code signatures in the tests
  umoci mmdebstrap             # the container-image tests make real OCI images (no daemon, no registry);
                               # mmdebstrap also builds the bare Debian 11 host of tests/integration/test_bare_host.py
  podman skopeo runc           # benchmarks/bench_oci.py: BUDA's runtime side by side (runc: crun refuses cgroup v1 hosts)
  gcc                          # boincvm guest-api compiles libboinc_api.a; the guest API tests build BOINCified C programs
  strace util-linux            # host-check tests: every exec of a refused job traced (no QEMU ran); setpriv runs the KVM probe as nobody
  # BOINC's real server for the tests (tests/boinc_server.py), built from source: Debian has no server package.
  autoconf automake libtool pkg-config m4 make g++  # BOINC's _autosetup, configure and make
  libmariadb-dev libmariadb-dev-compat              # the server's database library (mysql_config)
  libssl-dev libcurl4-openssl-dev zlib1g-dev        # configure requires them for the server
  nlohmann-json3-dev                                # configure stops without it
  libzip-dev                                        # zip/boinc_zip.cpp
  libfmt-dev libfcgi-dev                            # the scheduler's and upload handler's headers
  git                                               # clones BOINC at the pinned commit when no tarball is found
  # The server's services, our own instances only: the -core/-bin packages bring the programs
  # (mariadbd, mariadb-install-db, apache2) but not the machine's services, which stay off.
  mariadb-server-core mariadb-client                # the project database; mariadb-admin pings it
  apache2-bin libapache2-mod-php                    # CGI (scheduler, file_upload_handler) and the PHP web RPCs
  php-cli php-mysql php-xml                         # the PHP tools: bin/xadd, bin/update_versions, create_account.php
  python3-mysqldb                                   # make_project and bin/start need MySQLdb in /usr/bin/python3
)

[ "$BOOTSTRAP_FOR" = example ] || APT_PACKAGES+=("${TEST_PACKAGES[@]}")
LOG=$(mktemp -t boincvm-bootstrap.XXXXXX)
trap 'rm -f "$LOG"' EXIT
# quietly CMD...: runs it with its output in the log; on failure shows the log's tail.
quietly() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "bootstrap: '$*' failed; its last output:" >&2
    tail -n 40 "$LOG" >&2
    return 1
  fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${#missing[@]} Debian packages: ${missing[*]}" >&2
  quietly $SUDO apt-get update -qq
  quietly $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/boincvm ]; then
  echo "bootstrap: creating .venv" >&2
  quietly python3 -m venv .venv
  quietly .venv/bin/pip install -q --upgrade pip
fi
quietly .venv/bin/pip install -q -e '.[dev]'
export PATH="$PWD/.venv/bin:$PATH"

# The bundled example guest (kernel + initramfs with busybox and qemu-guest-agent),
# built from Debian packages and cached by content.
boincvm build-image --recipe minimal >/dev/null

[ "$BOOTSTRAP_FOR" = example ] && return 0

# The bare, older volunteer host (Debian 11 root file system with boinc-client 7.16, no python,
# no qemu) that tests/integration/test_bare_host.py runs the real client in; cached by its recipe.
python -m tests.bare_host >/dev/null

# BOINC's server, built from source (a vendored tarball, $BOINCVM_BOINC_SOURCE or a clone at the
# pinned commit) for tests/integration/test_boinc_server*.py; cached by content, minutes cold.
python -m tests.boinc_server >/dev/null
