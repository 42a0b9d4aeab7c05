#!/bin/sh
# Sets up mvm on a fresh Debian 12 / Ubuntu machine: installs the host
# packages, makes sure a Go toolchain is there, builds mvmctl and the guest
# agent, builds the default guest image (compiles the guest kernel once,
# about 5 minutes on 2 cores) and runs a first command in a microVM.
#
#   ./scripts/setup.sh            # everything, then: mvmctl exec -- uname -a
#   ./scripts/setup.sh --deps     # host packages and Go only
set -eu

cd "$(dirname "$0")/.."

GO_VERSION=1.26.8
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# Packages: QEMU (the VMM), busybox-static (guest userland), e2fsprogs
# (--add-dir images), mmdebstrap and debian-archive-keyring (Debian
# templates), umoci (the tests compare image unpacking with it), the
# kernel source and what compiling it needs, and curl/unzip to fetch Go
# if the machine has none.
KSRC=linux-source
if grep -qs '^12' /etc/debian_version; then KSRC=linux-source-6.1; fi
PKGS="qemu-system-x86 busybox-static e2fsprogs mmdebstrap debian-archive-keyring umoci $KSRC make gcc libc6-dev flex bison bc libelf-dev xz-utils bzip2 tar git ca-certificates curl unzip"

missing=
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "setup: installing$missing"
	$SUDO apt-get update -q
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
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
echo "setup: running a first command in a microVM"
bin/mvmctl exec -- uname -a
