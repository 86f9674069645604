# kshm — shared-memory transport for Kitex.
# The two set-up commands are `make example` and `make test`.

GO ?= go

.PHONY: all build test example example-upgrade bench bench-quick gen fuzz vet soak soak-engine clean

all: build

build:
	$(GO) build ./...
	$(GO) build -o bin/kshm ./cmd/kshm

# vet, the whole suite under the race detector (fuzz targets run on their
# seed corpus as part of it), the benchmark and prometheus modules' own
# tests, and the registry test with a real etcd.
test: vet
	$(GO) test -race -count=1 -timeout 30m ./...
	cd benchmark && $(GO) test -race -count=1 -timeout 10m ./...
	cd prometheus && $(GO) test -race -count=1 -timeout 5m ./...
	$(MAKE) test-registry

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
# several payload sizes over kshm and over plain Kitex (the same server's TCP
# address), prints both side by side, stops the server.
example:
	$(GO) run ./example/run

# Zero-downtime replacement: the example server replaced twice (a new server
# with the same flags, then SIGTERM to the old one) while a client calls it
# from 8 goroutines with 16 KiB payloads, every response verified; prints
# each phase's calls and which server answered them over which transport,
# and fails if any call failed.
example-upgrade:
	$(GO) run ./example/run -upgrade

# Cross-process benchmarks: kshm against its baselines, alternated in rounds,
# with the machine's calibration. bench-quick (a few minutes) writes
# benchmark/results/quick.json and results/quick/REPORT.md and prints every
# round and kshm/baseline ratios round by round; bench (about 45 minutes on a 2-vCPU VM)
# writes results/full.json and results/REPORT.md.
bench-quick:
	cd benchmark && $(GO) run ./cmd/bench -mode quick

bench:
	cd benchmark && $(GO) run ./cmd/bench -mode full

# Chaos soak: client and server processes killed and restarted at random,
# and the server replaced (a new one with the same options, the old one
# SIGTERMed: no call may fail), while regions grow and shrink under bursts
# and calms of traffic; every response verified, no buffer, region or
# descriptor leaked (SOAK=duration).
SOAK ?= 10m
soak: soak-engine
	$(GO) run ./soak -duration $(SOAK)

# The engine's close-race stress (shm TestStress_CloseRace) run for
# SOAK_ENGINE instead of its short pass in `make test`: sessions closed from
# either side at random, child peers killed with SIGKILL, every mapping,
# memfd, goroutine and heap byte back to baseline.
SOAK_ENGINE ?= 5m
soak-engine:
	KSHM_STRESS_DURATION=$(SOAK_ENGINE) $(GO) test -race -count=1 -timeout 0 -run '^TestStress_CloseRace$$' ./shm/

# Regenerates example/kitex_gen from example/idl (needs only the Go proxy).
gen:
	sh example/gen.sh

# Longer fuzzing of every parser of peer input (FUZZTIME per target). Each
# new interesting input is minimized for at most FUZZMINIMIZE (Go's default,
# 60 s, let FuzzValidateHeader spend most of its time minimizing 4 KiB
# headers instead of fuzzing).
FUZZTIME ?= 1m
FUZZMINIMIZE ?= 5s
fuzz:
	for f in FuzzDecodeHello FuzzParseFrame FuzzValidateHeader FuzzRecvDescriptors FuzzReleaseEntries; do \
		$(GO) test -run XXX -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZE) ./shm/ || exit 1; \
	done

clean:
	rm -rf bin
