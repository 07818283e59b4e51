#!/usr/bin/env bash
# Builds the local Kubernetes control plane from the Go modules pinned in tools/k8s:
# kube-apiserver, etcd, kubectl and helm; and, from tools/k8s/monitoring, controller-gen and the
# ServiceMonitor and PrometheusRule CRDs it generates from prometheus-operator's API types
# (in crds/ beside bin/). The binaries go to a cache outside the clone,
# keyed by the Kubernetes version and a hash of tools/k8s, and are reused when present.
#
#   scripts/k8s-tools.sh            build (or reuse); prints the bin directory on stdout
#   scripts/k8s-tools.sh --bin-dir  print the bin directory without building
#
# Progress goes to stderr. A failed step names the module or binary that failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MOD="$ROOT/tools/k8s"

fail() {
    echo "k8s-tools: $*" >&2
    exit 1
}

[[ -f "$MOD/go.mod" && -f "$MOD/go.sum" ]] || fail "tools/k8s/go.mod or go.sum is missing"

VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$MOD/go.mod")
[[ -n "$VERSION" ]] || fail "tools/k8s/go.mod does not require k8s.io/kubernetes"
HELM_VERSION=$(awk '$1 == "helm.sh/helm/v3" && $2 ~ /^v/ { print $2; exit }' "$MOD/go.mod")
[[ -n "$HELM_VERSION" ]] || fail "tools/k8s/go.mod does not require helm.sh/helm/v3"
# Bump when the build recipe below changes (flags, tools): the cache key changes with it.
RECIPE=3
KEY=$( (echo "recipe $RECIPE" && cat "$MOD/go.mod" "$MOD/go.sum" "$MOD/etcd/main.go" \
    "$MOD/monitoring/go.mod" "$MOD/monitoring/go.sum") |
    sha256sum | cut -c1-12)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rdphealth/k8s-$VERSION-$KEY"
BIN="$CACHE/bin"
CRDS="$CACHE/crds"
MONITORING_CRDS=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml)

if [[ "${1:-}" == "--bin-dir" ]]; then
    echo "$BIN"
    exit 0
fi

TOOLS=(etcd kube-apiserver kubectl helm controller-gen)
have_all() {
    local t
    for t in "${TOOLS[@]}"; do
        [[ -x "$BIN/$t" ]] || return 1
    done
    for t in "${MONITORING_CRDS[@]}"; do
        [[ -s "$CRDS/$t" ]] || return 1
    done
}

if have_all; then
    echo "k8s-tools: reusing $BIN (Kubernetes $VERSION)" >&2
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || fail "the go command is not installed (Go 1.26 or newer is needed)"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if have_all; then # another build finished while this one waited
    echo "$BIN"
    exit 0
fi

MAJOR=${VERSION#v}
MAJOR=${MAJOR%%.*}
MINOR=${VERSION#v*.}
MINOR=${MINOR%%.*}
KVER="-X k8s.io/component-base/version.gitVersion=$VERSION"
KVER+=" -X k8s.io/component-base/version.gitMajor=$MAJOR"
KVER+=" -X k8s.io/component-base/version.gitMinor=$MINOR"
KVER+=" -X k8s.io/component-base/version.gitTreeState=clean"
KVER+=" -X k8s.io/client-go/pkg/version.gitVersion=$VERSION"
KVER+=" -X k8s.io/client-go/pkg/version.gitMajor=$MAJOR"
KVER+=" -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"
# As helm's own release build: its default Kubernetes version (helm template, helm lint) is
# the one of the client-go it is built with, here the control plane's.
HVER="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in pkg/lint/rules pkg/chartutil; do
    HVER+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=$MAJOR -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$MINOR"
done

STAGE=$(mktemp -d "$CACHE/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

echo "k8s-tools: building Kubernetes $VERSION tools into $BIN with $(go version)" >&2
echo "k8s-tools: downloading modules listed in tools/k8s/go.sum and tools/k8s/monitoring/go.sum" >&2
(cd "$MOD" && go mod download) || fail "go mod download in tools/k8s failed"
(cd "$MOD/monitoring" && go mod download) || fail "go mod download in tools/k8s/monitoring failed"

TOTAL_START=$SECONDS
build() {
    local name=$1 pkg=$2 ldflags=$3 dir=${4:-$MOD} start=$SECONDS
    echo "k8s-tools: building $name ($pkg) ..." >&2
    (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" \
        -o "$STAGE/$name" "$pkg") || fail "building $name from $pkg failed"
    echo "k8s-tools: built $name in $((SECONDS - start)) s" >&2
}
build etcd ./etcd ""
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$KVER"
build kubectl k8s.io/kubernetes/cmd/kubectl "$KVER"
build helm helm.sh/helm/v3/cmd/helm "$HVER"
build controller-gen sigs.k8s.io/controller-tools/cmd/controller-gen "" "$MOD/monitoring"

echo "k8s-tools: generating the ServiceMonitor and PrometheusRule CRDs" >&2
mkdir -p "$STAGE/crds"
(cd "$MOD/monitoring" && "$STAGE/controller-gen" crd:crdVersions=v1,maxDescLen=0 \
    paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 \
    output:crd:dir="$STAGE/crds") || fail "controller-gen could not generate the monitoring CRDs"

mkdir -p "$BIN" "$CRDS"
for t in "${TOOLS[@]}"; do
    mv -f "$STAGE/$t" "$BIN/$t"
done
for t in "${MONITORING_CRDS[@]}"; do
    [[ -s "$STAGE/crds/$t" ]] || fail "controller-gen did not write $t"
    mv -f "$STAGE/crds/$t" "$CRDS/$t"
done
echo "k8s-tools: built ${TOOLS[*]} and the monitoring CRDs in $((SECONDS - TOTAL_START)) s into $BIN" >&2
echo "$BIN"
