# mvm: run commands in throwaway microVMs.
#
#   make build       build bin/mvmctl, bin/mvm-agent, bin/mvm-jailer and the containerd shim
#   make bootstrap   build the default guest image (kernel + initramfs)
#   make test        unit tests and the end-to-end suite on real VMs
#   make bench       benchmarks against bare baselines (prints ratios)
#   make compat      CPython's regression suite, 49 modules, in a VM and on the host
#   make fuzz        run every fuzz target for FUZZTIME (default 30s) each
#   make install     install into $(PREFIX)

PREFIX  ?= /usr/local
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: all build bootstrap test unit e2e compat bench fuzz lint proto check-proto install clean

all: build

build:
	@mkdir -p bin
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/mvmctl ./cmd/mvmctl
	# The agent runs in a guest with no shared libraries: static, no cgo.
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/mvm-agent ./cmd/mvm-agent
	# Confines QEMU when mvm runs as root (see cmd/mvm-jailer).
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/mvm-jailer ./cmd/mvm-jailer
	# containerd's runtime io.containerd.mvm.v2 (docs/kubernetes.md).
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/containerd-shim-mvm-v2 ./cmd/containerd-shim-mvm-v2

bootstrap: build
	bin/mvmctl bootstrap

# The whole suite: vet, unit tests (with the race detector), then the
# end-to-end tests, which boot real VMs and fail (never skip) when QEMU,
# the kernel or the image is missing.
test: lint unit e2e

lint:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# The SDK's examples (package mvm) boot real VMs from the default image;
# as root they need mvm-jailer, which build makes.
unit: build
	MVM_JAILER=$(CURDIR)/bin/mvm-jailer $(GO) test -race -count=1 $$($(GO) list ./... | grep -v /test/)

e2e: build
	$(GO) test -count=1 -timeout 30m ./test/e2e/ -mvmctl=$(CURDIR)/bin/mvmctl

# CPython's regression tests for the long module list, in a Debian
# template and on the host (docs/guest.md); make test runs a short list.
compat: build
	$(GO) test -count=1 -timeout 90m -run '^TestCPythonSuite$$' ./test/e2e/ -mvmctl=$(CURDIR)/bin/mvmctl -compat-full -v

bench: build
	$(GO) test -count=1 -timeout 60m -run '^$$' -bench . -benchtime 1x ./test/bench/ -mvmctl=$(CURDIR)/bin/mvmctl

# Fuzz targets as PACKAGE:TARGET, each run for FUZZTIME. Their seed
# corpora also run as plain tests in `make unit`. Some inputs are whole
# disk images: minimizing one for long would eat the run. FUZZTIME may be
# a count of inputs (2000x), which CI uses: Go 1.26 can fail a target with
# "context deadline exceeded" at the end of a timed run under load
# (go.dev/issue/75804), a count has no deadline.
FUZZTIME ?= 30s
FUZZ_TARGETS += ./internal/ext4:FuzzReader ./internal/writeback:FuzzChangeSet
FUZZ_TARGETS += ./internal/mux:FuzzClientSession
FUZZ_TARGETS += ./internal/agentproto:FuzzReadResponse
FUZZ_TARGETS += ./internal/agentproto:FuzzReadExecEvent
FUZZ_TARGETS += ./internal/agent:FuzzSuperblockLabel ./internal/agent:FuzzAccountFiles ./internal/agent:FuzzHostsFile
FUZZ_TARGETS += ./internal/dirimage:FuzzHashTree ./internal/dirimage:FuzzBuild
FUZZ_TARGETS += ./internal/launchplan:FuzzParse ./internal/adddir:FuzzParse
FUZZ_TARGETS += ./internal/oci:FuzzLayer ./internal/network:FuzzDNS ./internal/treecopy:FuzzExtract

.PHONY: fuzz
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $${t%%:*}; \
	done

# Regenerate the agent protocol's Go code (needs protoc and protoc-gen-go).
proto:
	protoc --go_out=. --go_opt=module=github.com/mvm-sh/mvm api/agent/v1/agent.proto

check-proto: proto
	@git diff --exit-code -- api/ || { echo "generated protocol code is stale: run make proto"; exit 1; }

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/libexec/mvm
	install -m 0755 bin/mvmctl $(DESTDIR)$(PREFIX)/bin/mvmctl
	install -m 0755 bin/mvm-agent $(DESTDIR)$(PREFIX)/libexec/mvm/mvm-agent
	install -m 0755 bin/mvm-jailer $(DESTDIR)$(PREFIX)/libexec/mvm/mvm-jailer
	install -m 0755 bin/containerd-shim-mvm-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-mvm-v2

clean:
	rm -rf bin
