#!/usr/bin/env bash
# Instructions per probe against a real xrdp, counted by Valgrind's callgrind (instruction
# counts are stable on a busy machine where CPU time is not).
#
# Method: `rdphealth probe --count 21` minus `rdphealth probe --count 1`, divided by 20, so
# process start-up, the runtime and the TLS configuration are not counted; the difference is
# also broken down by function (self cost, the top entries).
#
# Usage: bench/probe-profile.sh           (after `cargo build --release`; run as root, like the
#                                          xrdp tests: xrdp's key is readable by root only)
# Knobs (environment): SECURITY_LAYER=tls COUNT=21 TOP=40 KEEP=dir (keep the callgrind files)
#   RDPHEALTH_BIN=target/release/rdphealth
# xrdp listens on 127.0.0.1 only and is stopped by its PID.
set -euo pipefail

BIN=${RDPHEALTH_BIN:-target/release/rdphealth}
LAYER=${SECURITY_LAYER:-tls}
COUNT=${COUNT:-21}
TOP=${TOP:-40}

command -v valgrind >/dev/null || { echo "missing valgrind (apt-get install -y valgrind)" >&2; exit 2; }
[ -x /usr/sbin/xrdp ] || { echo "missing xrdp (apt-get install -y xrdp)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release" >&2; exit 2; }

work=$(mktemp -d)
XRDP_PID=""
cleanup() {
    [ -n "$XRDP_PID" ] && kill "$XRDP_PID" 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp "$work"/cg.* "$KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sh /usr/share/xrdp/socksetup >/dev/null 2>&1 || true
awk -v port="$port" -v layer="$LAYER" -v logfile="$work/xrdp.log" '
    /^port=3389$/ { print "port=tcp://127.0.0.1:" port; next }
    /^security_layer=/ { print "security_layer=" layer; next }
    /^LogFile=xrdp.log$/ { print "LogFile=" logfile; next }
    /^EnableSyslog=/ { print "EnableSyslog=false"; next }
    { print }
' /etc/xrdp/xrdp.ini >"$work/xrdp.ini"
/usr/sbin/xrdp --nodaemon --config "$work/xrdp.ini" </dev/null >/dev/null 2>&1 &
XRDP_PID=$!
hexport=$(printf ':%04X ' "$port")
for _ in $(seq 1 500); do
    awk -v p="$hexport" '$4 == "0A" && ($2 " ") ~ p { found = 1 } END { exit !found }' /proc/net/tcp && break
    sleep 0.02
done

target="127.0.0.1:$port"
"$BIN" probe "$target" --count 1 >/dev/null || { echo "the probe of xrdp ($LAYER) failed" >&2; exit 1; }

profile() {
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$1" \
        "$BIN" probe "$target" --count "$1" --interval 20ms >"$work/out.$1" 2>"$work/vg.$1"
    grep -c '^reachable' "$work/out.$1" >/dev/null || true
}
profile 1
profile "$COUNT"

total() { awk '/^summary:/ { print $2 }' "$1"; }
one=$(total "$work/cg.1")
many=$(total "$work/cg.$COUNT")
per=$(( (many - one) / (COUNT - 1) ))
echo "xrdp security_layer=$LAYER; instructions: --count 1: $one, --count $COUNT: $many"
echo "instructions per probe: $per"
echo

# Self cost per function, --count N minus --count 1, per probe.
flat() {
    callgrind_annotate --inclusive=no --threshold=100 "$1" 2>/dev/null |
        awk '/^ *[0-9,]+ \(/ { n = $1; gsub(",", "", n); sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, ""); print n "\t" $0 }'
}
flat "$work/cg.1" >"$work/flat.1"
flat "$work/cg.$COUNT" >"$work/flat.$COUNT"
echo "top $TOP functions by self instructions per probe:"
awk -F'\t' -v n="$((COUNT - 1))" -v top="$TOP" -v per="$per" '
    FNR == NR { base[$2] += $1; next }
    { d[$2] += $1 }
    END {
        for (f in base) if (!(f in d)) d[f] = 0
        for (f in d) printf "%d\t%s\n", (d[f] - base[f]) / n, f
    }
' "$work/flat.1" "$work/flat.$COUNT" | sort -t$'\t' -k1,1nr | awk -v top="$TOP" 'NR <= top' |
    awk -F'\t' -v per="$per" '{ printf "%10d  %5.1f%%  %s\n", $1, 100 * $1 / per, substr($2, 1, 150) }'

# Whether xrdp resumes a TLS session: Python's ssl (OpenSSL) client negotiates X.224 as the
# probe does, then offers the session (ticket) of the previous connection, for TLS 1.3 and 1.2.
echo
python3 - "$port" <<'PY'
import socket, ssl, struct, sys
port = int(sys.argv[1])
body = bytes([0xE0, 0, 0, 0, 0, 0]) + struct.pack("<BBHI", 1, 0, 8, 1)  # RDP_NEG_REQ: SSL
request = struct.pack(">BBH", 3, 0, 5 + len(body)) + bytes([len(body)]) + body
for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    session, seen = None, []
    for _ in range(3):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw.sendall(request)
        raw.recv(64)
        tls = ctx.wrap_socket(raw, session=session)
        tls.settimeout(0.3)
        try:
            tls.recv(1)  # lets TLS 1.3 session tickets arrive
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        seen.append((tls.session_reused, bool(tls.session and tls.session.has_ticket)))
        session = tls.session
        tls.close()
    resumed = any(r for r, _ in seen[1:])
    tickets = all(t for _, t in seen)
    print(f"{version.name}: session ticket issued: {'yes' if tickets else 'no'}; "
          f"offered again, resumed: {'yes' if resumed else 'no'}")
PY

# Inclusive instructions per probe of the functions that stand for each part of a probe.
incl() {
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
        awk '/^ *[0-9,]+ \(/ { n = $1; gsub(",", "", n); sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, ""); sub(/ \[[^]]*\]$/, ""); print n "\t" $0 }'
}
incl "$work/cg.1" >"$work/incl.1"
incl "$work/cg.$COUNT" >"$work/incl.$COUNT"
echo
echo "where the instructions go (inclusive, per probe; parts overlap where one calls another):"
while IFS='|' read -r label pattern; do
    awk -F'\t' -v n="$((COUNT - 1))" -v re="$pattern" -v per="$per" -v label="$label" '
        FNR == NR { if ($2 ~ re) base += $1; next }
        $2 ~ re { d += $1 }
        END { v = (d - base) / n; printf "%10d  %5.1f%%  %s\n", v, 100 * v / per, label }
    ' "$work/incl.1" "$work/incl.$COUNT"
done <<'PARTS'
one probe: Run::walk, all layers (the rest: runtime, timers, report)|^[?]+:rdphealth::probe::Run::walk::[{][{]closure[}][}]$
TCP connect (user space; the kernel's part is not counted)|^[?]+:tokio::net::tcp::stream::TcpStream::connect_addr::[{][{]closure[}][}]$
X.224 negotiation (rdphealth::probe::negotiate)|^[?]+:rdphealth::probe::negotiate::[{][{]closure[}][}]$
TLS client hello incl. X25519 key generation|^[?]+:rustls::client::hs::ClientHelloInput::start_handshake$
X25519 key generation|^[?]+:ring::ec::curve25519::x25519::x25519_public_from_private$
X25519 agreement|^[?]+:ring::ec::curve25519::x25519::x25519_ecdh$
TLS 1.3 CertificateVerify (RSA signature check)|^[?]+:<rustls::client::tls13::ExpectCertificateVerify as
TLS Finished|^[?]+:<rustls::client::tls13::ExpectFinished as
SHA-384 compression (transcript, HKDF, HMAC)|^[?]+:ring::digest::dynstate::sha512_block_data_order$
SHA-256 compression|^[?]+:ring::digest::dynstate::sha256_block_data_order$
certificate facts: cache lookup or parse|^[?]+:rdphealth::probe::cert::(CertificateFacts::from_der|CertificateCache::facts)$
certificate self-signature check (x509-parser)|^[?]+:x509_parser::verify::verify_signature$
close (close_notify, FIN)|^[?]+:rdphealth::probe::close::[{][{]closure[}][}]$
allocation (malloc, free, realloc)|^[^:]*malloc.c:(malloc|free|realloc|calloc)$
printing the report (probe command only)|^[?]+:rdphealth::cli::probe::print_report$
PARTS
