#!/bin/sh
# Sets up mvm on a fresh Debian 12 / Ubuntu machine: installs the host
# packages (everything make test and make bench need too), makes sure a Go
# toolchain is there, builds mvmctl and the guest agent, builds the default
# guest image (compiles the guest kernel once, about 5 minutes on 2 cores),
# checks the host with mvmctl doctor and runs a first command in a microVM.
#
#   ./scripts/setup.sh            # everything, then: mvmctl exec -- uname -a
#   ./scripts/setup.sh --deps     # host packages and Go only
set -eu

cd "$(dirname "$0")/.."

GO_VERSION=1.26.8
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# Packages mvm needs, and what needs each:
#   qemu-system-x86          the VMM
#   busybox-static           the guest userland (mvmctl bootstrap)
#   e2fsprogs                --add-dir images (mkfs.ext4, e2fsck); debugfs in the tests
#   mmdebstrap, debian-archive-keyring
#                            templates from Debian (and the suite's Python template)
#   umoci                    the template tests compare image unpacking with it
#   linux-source*, make, gcc, libc6-dev, flex, bison, bc, patch, libelf-dev,
#   xz-utils, bzip2, tar     compiling the guest kernel once; gcc and
#                            libc6-dev also for the race detector (make test)
#   git                      the version make build stamps in
#   containerd               make test: the containerd shim's tests run a real
#                            containerd (1.6 on Debian 12) and its ctr
#   containernetworking-plugins, iproute2
#                            a pod's network in the shim's tests (CNI's bridge
#                            and host-local; tc for the pod's TAP)
#   ca-certificates, curl, unzip   fetching Go when the machine has none
KSRC=linux-source
if grep -qs '^12' /etc/debian_version; then KSRC=linux-source-6.1; fi
PKGS="qemu-system-x86 busybox-static e2fsprogs mmdebstrap debian-archive-keyring umoci containerd containernetworking-plugins iproute2 $KSRC make gcc libc6-dev flex bison bc patch libelf-dev xz-utils bzip2 tar git ca-certificates curl unzip"
# Packages for benchmarks and optional features; setup goes on without
# them where the distribution lacks one:
#   rsync                    make bench: (e) compares the write-back with rsync -a --delete
#   runsc                    make bench: gVisor's `runsc do`, the baseline of the
#                            snapshot-restore benchmark
#   uidmap                   lets mmdebstrap build Debian templates without root
#   libpython3.11-testsuite  make test: CPython's own tests, run on the host and
#                            in a Debian template (TestCPythonSuite, Debian 12)
EXTRA="rsync runsc uidmap"
if grep -qs '^12' /etc/debian_version; then EXTRA="$EXTRA libpython3.11-testsuite"; fi

missing() {
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf ' %s' "$p"
	done
}
need=$(missing $PKGS)
want=$(missing $EXTRA)
if [ -n "$need$want" ]; then
	echo "setup: installing$need$want"
	$SUDO apt-get update -q
	install="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
	[ -z "$need" ] || $install $need
	for p in $want; do
		$install "$p" || echo "setup: could not install $p (see the comment in $0 for what needs it); going on"
	done
fi

# Go: use the one on PATH or in /usr/local/go if it is new enough (the go
# command fetches the exact toolchain go.mod asks for through the module
# proxy); otherwise unpack the toolchain module from the Go module proxy.
export PATH="$PATH:/usr/local/go/bin"
go_ok() {
	command -v go >/dev/null 2>&1 || return 1
	v=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
	major=$(echo "$v" | cut -d. -f1)
	minor=$(echo "$v" | cut -d. -f2)
	[ "${major:-0}" -gt 1 ] || [ "${minor:-0}" -ge 21 ]
}
if ! go_ok; then
	dest=/usr/local/lib/mvm-go
	echo "setup: fetching Go $GO_VERSION from the Go module proxy into $dest"
	tmp=$(mktemp -d)
	mod="golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-amd64"
	curl -fsSL -o "$tmp/go.zip" "${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-amd64.zip"
	(cd "$tmp" && unzip -q go.zip)
	$SUDO rm -rf "$dest"
	$SUDO mv "$tmp/$mod" "$dest"
	$SUDO chmod -R a+rX "$dest"
	$SUDO chmod a+x "$dest/bin/"* "$dest/pkg/tool/"*/* 2>/dev/null || true
	rm -rf "$tmp"
	export PATH="$dest/bin:$PATH"
fi
[ "${1:-}" = "--deps" ] && exit 0

make build
bin/mvmctl bootstrap
# Everything a run needs, checked; a failing check stops here and says
# what to run.
bin/mvmctl doctor
echo "setup: running a first command in a microVM"
bin/mvmctl exec -- uname -a
