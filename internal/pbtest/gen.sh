#!/bin/sh
# Regenerates internal/pbtest/kitex_gen from internal/pbtest/idl/echo.proto (Kitex Protobuf,
# generated without protoc) and internal/pbtest/idl/ttstream.thrift (TTHeader streaming, which
# Kitex v0.16.3 carries for Thrift only; generated with -streamx). Works from any directory (it changes to the repository root).
# The generator (kitex v0.16.3) is pinned in tools/go.mod.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rm -rf internal/pbtest/kitex_gen
go tool -modfile=tools/go.mod kitex \
	-module github.com/shmkit/kshm \
	-type protobuf \
	-gen-path internal/pbtest/kitex_gen \
	internal/pbtest/idl/echo.proto
go tool -modfile=tools/go.mod kitex \
	-module github.com/shmkit/kshm \
	-streamx \
	-gen-path internal/pbtest/kitex_gen \
	internal/pbtest/idl/ttstream.thrift
