# kshm — shared-memory transport for Kitex.
# The two set-up commands are `make example` and `make test`.

GO ?= go

.PHONY: all build test example bench bench-quick gen fuzz vet soak clean

all: build

build:
	$(GO) build ./...
	$(GO) build -o bin/kshm ./cmd/kshm

# vet, the whole suite under the race detector (fuzz targets run on their
# seed corpus as part of it), and the benchmark module's own tests.
test: vet
	$(GO) test -race -count=1 -timeout 30m ./...
	cd benchmark && $(GO) test -race -count=1 -timeout 10m ./...
	cd prometheus && $(GO) test -race -count=1 -timeout 5m ./...

# kshm with a real registry: embedded etcd, one kshm and one plain instance
# (its own module, so that etcd stays out of kshm's go.mod; building etcd
# under -race takes a few minutes the first time).
test-registry:
	cd registrytest && $(GO) vet ./... && $(GO) test -race -count=1 -timeout 10m ./...

vet:
	$(GO) vet ./...
	cd benchmark && $(GO) vet ./...
	cd prometheus && $(GO) vet ./...

# An echo service over shared memory: starts the server, runs the client at
# several payload sizes, prints what it did, stops the server.
example:
	$(GO) run ./example/run

# Cross-process benchmarks: kshm against its baselines, alternated in rounds.
bench-quick:
	cd benchmark && $(GO) run ./cmd/bench -mode quick

bench:
	cd benchmark && $(GO) run ./cmd/bench -mode full

# Chaos soak: client and server processes killed and restarted at random,
# every response verified, no buffer or descriptor leaked (SOAK=duration).
SOAK ?= 10m
soak:
	$(GO) run ./soak -duration $(SOAK)

# Regenerates example/kitex_gen from example/idl (needs only the Go proxy).
gen:
	sh example/gen.sh

# Longer fuzzing of every parser of peer input (FUZZTIME per target).
FUZZTIME ?= 1m
fuzz:
	for f in FuzzDecodeHello FuzzParseFrame FuzzValidateHeader FuzzRecvDescriptors FuzzReleaseEntries; do \
		$(GO) test -run XXX -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./shm/ || exit 1; \
	done

clean:
	rm -rf bin
