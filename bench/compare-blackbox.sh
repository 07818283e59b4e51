#!/usr/bin/env bash
# Side-by-side CPU cost per probe: Prometheus blackbox_exporter (tcp prober with TLS, driven
# through its /probe endpoint) against rdphealth's prober (TCP + X.224 negotiation + TLS +
# certificate facts), on the same loopback TLS responders, at the same rate, in one run.
#
# Usage: bench/compare-blackbox.sh            (after `cargo build --release`)
# Knobs (environment): VMS=20 RATE=20 DURATION=30 BB_PORT=19115
#   RDPHEALTH_BIN=target/release/rdphealth BLACKBOX_BIN=/usr/bin/prometheus-blackbox-exporter
# Everything listens on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail

BIN=${RDPHEALTH_BIN:-target/release/rdphealth}
BLACKBOX=${BLACKBOX_BIN:-/usr/bin/prometheus-blackbox-exporter}
VMS=${VMS:-20}
RATE=${RATE:-20}
DURATION=${DURATION:-30}
BB_PORT=${BB_PORT:-19115}
TICKS=$(getconf CLK_TCK)

work=$(mktemp -d)
SIM_PID=""
BB_PID=""
cleanup() {
    [ -n "$BB_PID" ] && kill "$BB_PID" 2>/dev/null || true
    [ -n "$SIM_PID" ] && kill -INT "$SIM_PID" 2>/dev/null || true
    sleep 0.5
    [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# CPU seconds (user + system) of a process so far.
cpu_of() {
    sed 's/^.*) //' "/proc/$1/stat" | awk -v t="$TICKS" '{ printf "%.3f", ($12 + $13) / t }'
}

[ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release" >&2; exit 2; }
[ -x "$BLACKBOX" ] || { echo "missing $BLACKBOX" >&2; exit 2; }

# The responders: their own process; each port answers direct TLS and X.224-then-TLS.
"$BIN" bench responders --count "$VMS" --for "$((DURATION * 3 + 120))s" \
    >"$work/sim.out" 2>"$work/sim.err" &
SIM_PID=$!
for _ in $(seq 1 300); do
    [ "$(grep -c '^responder ' "$work/sim.out" || true)" -ge "$VMS" ] && break
    sleep 0.1
done
mapfile -t TARGETS < <(awk '/^responder /{ print $2 }' "$work/sim.out")
[ "${#TARGETS[@]}" -ge 1 ] || { echo "simulator did not start" >&2; cat "$work/sim.err" >&2; exit 1; }

cat >"$work/blackbox.yml" <<YAML
modules:
  tcp_tls:
    prober: tcp
    timeout: 5s
    tcp:
      tls: true
      tls_config:
        insecure_skip_verify: true
YAML
"$BLACKBOX" --config.file="$work/blackbox.yml" --web.listen-address="127.0.0.1:$BB_PORT" \
    --log.level=error >"$work/bb.out" 2>&1 &
BB_PID=$!
for _ in $(seq 1 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$BB_PORT/-/healthy" && break
    sleep 0.1
done
probe_url() { echo "http://127.0.0.1:$BB_PORT/probe?target=$1&module=tcp_tls"; }
if ! curl -fs "$(probe_url "${TARGETS[0]}")" | grep -q '^probe_success 1'; then
    echo "blackbox_exporter's probe of ${TARGETS[0]} did not succeed" >&2
    exit 1
fi

total=$((RATE * DURATION))
period=$(awk -v r="$RATE" 'BEGIN { printf "%.6f", 1 / r }')

# blackbox_exporter: one /probe request per tick, round-robin over the targets.
bb0=$(cpu_of "$BB_PID")
start=$EPOCHREALTIME
pids=()
for i in $(seq 0 $((total - 1))); do
    t=${TARGETS[$((i % ${#TARGETS[@]}))]}
    curl -s -o "$work/bb-$((i % 4)).txt" "$(probe_url "$t")" &
    pids+=($!)
    # Sleep until the next tick of the fixed schedule.
    next=$(awk -v s="$start" -v i="$i" -v p="$period" 'BEGIN { printf "%.6f", s + (i + 1) * p }')
    wait_s=$(awk -v n="$next" -v now="$EPOCHREALTIME" 'BEGIN { d = n - now; printf "%.6f", (d > 0 ? d : 0) }')
    sleep "$wait_s"
done
wait "${pids[@]}"
bb1=$(cpu_of "$BB_PID")
bb_ok=$(grep -l '^probe_success 1' "$work"/bb-*.txt | wc -l)

# rdphealth: the same targets, rate and count, in its own process.
joined=$(IFS=,; echo "${TARGETS[*]}")
ours=$("$BIN" bench probe --targets "$joined" --rate "$RATE" --duration "${DURATION}s")

bb_cpu=$(awk -v a="$bb0" -v b="$bb1" 'BEGIN { printf "%.3f", b - a }')
bb_per=$(awk -v c="$bb_cpu" -v n="$total" 'BEGIN { printf "%.3f", c * 1000 / n }')
our_per=$(echo "$ours" | sed 's/.*cpu_per_probe_ms=//')
our_cpu=$(echo "$ours" | sed 's/.*cpu_ms=\([0-9.]*\).*/\1/' | awk '{ printf "%.3f", $1 / 1000 }')
our_ok=$(echo "$ours" | sed 's/.*reachable=\([0-9]*\).*/\1/')
ratio=$(awk -v a="$our_per" -v b="$bb_per" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')

echo "targets: ${#TARGETS[@]} loopback TLS responders; rate ${RATE}/s for ${DURATION}s = $total probes each"
echo
echo "| prober | what it does | probes | CPU s | CPU per probe | succeeded |"
echo "|---|---|---|---|---|---|"
echo "| blackbox_exporter $("$BLACKBOX" --version 2>&1 | awk 'NR==1{print $3}') (/probe, tcp + tls) | TCP + TLS handshake, HTTP request, metrics text | $total | $bb_cpu | $bb_per ms | last 4 sampled: $bb_ok/4 ok |"
echo "| rdphealth prober | TCP + X.224 negotiation + TLS + certificate facts | $total | $our_cpu | $our_per ms | $our_ok/$total |"
echo
echo "ratio rdphealth / blackbox_exporter CPU per probe: $ratio (target: <= 0.2)"
