#!/bin/sh
# Regenerates example/kitex_gen from example/idl/echo.thrift.
# Works from any directory (it changes to the repository root). The generator (kitex v0.16.3)
# is pinned in tools/go.mod so it stays out of the root module's requirements.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rm -rf example/kitex_gen
go tool -modfile=tools/go.mod kitex \
	-module github.com/shmkit/kshm \
	-gen-path example/kitex_gen \
	example/idl/echo.thrift
