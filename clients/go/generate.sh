#!/usr/bin/env bash
# Generates the Go stubs in mediacachepb/ from proto/, or with --check fails when the committed
# ones differ from fresh ones. Needs protoc, protoc-gen-go and protoc-gen-go-grpc (Debian:
# protobuf-compiler protoc-gen-go protoc-gen-go-grpc; the committed stubs come from protoc 3.21,
# protoc-gen-go 1.28 and protoc-gen-go-grpc 1.33, the versions there).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
import="github.com/mediacache/mediacache/clients/go/mediacachepb"
map="Mmediacache/v1/mediacache.proto=$import;mediacachepb"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
protoc -I "$root/proto" \
  --go_out="$scratch" --go_opt=paths=source_relative --go_opt="$map" \
  --go-grpc_out="$scratch" --go-grpc_opt=paths=source_relative --go-grpc_opt="$map" \
  "$root/proto/mediacache/v1/mediacache.proto"
mkdir -p "$scratch/out"
cp "$scratch/mediacache/v1/"*.go "$scratch/out/"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r "$scratch/out" "$here/mediacachepb" >/dev/null; then
    echo "stale Go stubs in clients/go/mediacachepb: run clients/go/generate.sh" >&2
    exit 1
  fi
else
  rm -rf "$here/mediacachepb"
  cp -r "$scratch/out" "$here/mediacachepb"
fi
