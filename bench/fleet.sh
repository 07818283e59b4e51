#!/usr/bin/env bash
# Fleet benchmark: `rdphealth sim` with N healthy VMs in its own process, then
# `rdphealth bench fleet` driving all of them with the engine; prints one table.
#
# Usage: bench/fleet.sh            (after `cargo build --release`)
# Knobs (environment): VMS=1000 INTERVAL=30s DURATION=120s SIM_PORT=18680
#   OUTAGE=0.01 (share of VMs given an outage after the window) RDPHEALTH_BIN=target/release/rdphealth
#   MEMBERS=1: one RdpHealthFleet over every VM (discovered through Resource Graph, probed in
#   memory) instead of one RdpHealth per VM
# Everything listens on 127.0.0.1; the simulator is stopped by its PID at the end.
set -euo pipefail

BIN=${RDPHEALTH_BIN:-target/release/rdphealth}
VMS=${VMS:-1000}
INTERVAL=${INTERVAL:-30s}
DURATION=${DURATION:-120s}
SIM_PORT=${SIM_PORT:-18680}
OUTAGE=${OUTAGE:-0.01}
MEMBERS_FLAG=()
[ "${MEMBERS:-0}" = 1 ] && MEMBERS_FLAG=(--members)

# One listening socket per VM in the simulator, one connection per probe in the operator.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((VMS + 1024)) ] || { echo "open-files limit $(ulimit -n) is too low for $VMS VMs" >&2; exit 2; }

work=$(mktemp -d)
SIM_PID=""
cleanup() {
    [ -n "$SIM_PID" ] && kill -INT "$SIM_PID" 2>/dev/null || true
    sleep 1
    [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$BIN" bench scenario --vms "$VMS" >"$work/scenario.yaml"
RUST_LOG=warn "$BIN" sim --listen "127.0.0.1:$SIM_PORT" --scenario "$work/scenario.yaml" \
    >"$work/sim.out" 2>"$work/sim.err" &
SIM_PID=$!
for _ in $(seq 1 $((1200 + VMS / 20))); do
    [ "$(grep -c '^VM ' "$work/sim.out" || true)" -ge "$VMS" ] && break
    sleep 0.1
done
[ "$(grep -c '^VM ' "$work/sim.out" || true)" -ge "$VMS" ] || { echo "simulator did not start" >&2; cat "$work/sim.err" >&2; exit 1; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
RUST_LOG=warn "$BIN" bench fleet --sim "127.0.0.1:$SIM_PORT" --interval "$INTERVAL" --duration "$DURATION" \
    --outage-fraction "$OUTAGE" "${MEMBERS_FLAG[@]}"
sim_cpu=$(sed 's/^.*) //' "/proc/$SIM_PID/stat" | awk -v t="$(getconf CLK_TCK)" '{ printf "%.1f", ($12 + $13) / t }')
echo
echo "simulator process CPU over the whole run (not the operator's): ${sim_cpu} s"
