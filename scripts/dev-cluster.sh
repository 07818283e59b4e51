#!/usr/bin/env bash
# A local Kubernetes control plane for people: etcd + kube-apiserver on free loopback ports,
# built from tools/k8s by scripts/k8s-tools.sh. No kubelet, scheduler or controller-manager:
# the operator runs as a process on this machine (see the README's local playground).
#
#   scripts/dev-cluster.sh up     start it, install the CRD, print how to use it
#   scripts/dev-cluster.sh env    print `export KUBECONFIG=... PATH=...` (eval "$(... env)")
#   scripts/dev-cluster.sh down   stop it (by PID) and delete its directory
#
# State lives in $RDPHEALTH_DEV_CLUSTER_DIR (default ${XDG_RUNTIME_DIR:-/tmp}/rdphealth-dev-cluster).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${RDPHEALTH_DEV_CLUSTER_DIR:-${XDG_RUNTIME_DIR:-/tmp}/rdphealth-dev-cluster}

fail() {
    echo "dev-cluster: $*" >&2
    exit 1
}

# A free loopback port below the kernel's ephemeral range: a port from bind(0), once released,
# can be taken by any outgoing connection before etcd or kube-apiserver binds it.
free_port() {
    python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(10000, max(low, 11000)), 200):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free loopback port below the ephemeral range")
PY
}

running() {
    [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

print_env() {
    echo "export KUBECONFIG=$DIR/kubeconfig"
    echo "export PATH=$(cat "$DIR/bin-dir"):\$PATH"
}

stop() {
    local name pid
    for name in kube-apiserver etcd; do
        [[ -f "$DIR/$name.pid" ]] || continue
        pid=$(cat "$DIR/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            echo "dev-cluster: stopped $name (pid $pid)" >&2
        fi
        rm -f "$DIR/$name.pid"
    done
}

pki() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=rdphealth-dev-ca -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kube-apiserver \
        -keyout "$DIR/serving.key" -out "$DIR/serving.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$DIR/serving.ext"
    openssl x509 -req -in "$DIR/serving.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
        -CAcreateserial -days 30 -extfile "$DIR/serving.ext" -out "$DIR/serving.crt" 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/sa.key"
    openssl pkey -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub"
}

up() {
    if running kube-apiserver; then
        echo "dev-cluster: already running; its environment:" >&2
        print_env
        return
    fi
    stop
    command -v openssl >/dev/null || fail "openssl is needed to make the certificates"
    local bin
    bin=$("$ROOT/scripts/k8s-tools.sh") || fail "the control plane's binaries could not be built"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    echo "$bin" >"$DIR/bin-dir"
    local start=$SECONDS
    pki
    local token
    token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    echo "$token,admin,admin,\"system:masters\"" >"$DIR/tokens.csv"

    local etcd_port peer_port port
    etcd_port=$(free_port)
    peer_port=$(free_port)
    port=$(free_port)
    setsid "$bin/etcd" --name default --data-dir "$DIR/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "default=http://127.0.0.1:$peer_port" \
        --log-level warn </dev/null >"$DIR/etcd.log" 2>&1 &
    echo $! >"$DIR/etcd.pid"
    setsid "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
        --cert-dir "$DIR/apiserver-certs" \
        --tls-cert-file "$DIR/serving.crt" --tls-private-key-file "$DIR/serving.key" \
        --client-ca-file "$DIR/ca.crt" --token-auth-file "$DIR/tokens.csv" \
        --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$DIR/sa.pub" \
        --service-account-signing-key-file "$DIR/sa.key" \
        --service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none --profiling=false \
        </dev/null >"$DIR/kube-apiserver.log" 2>&1 &
    echo $! >"$DIR/kube-apiserver.pid"

    cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rdphealth-dev
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $DIR/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: rdphealth-dev
  context:
    cluster: rdphealth-dev
    user: admin
    namespace: default
current-context: rdphealth-dev
EOF
    chmod 600 "$DIR/kubeconfig"

    for _ in $(seq 900); do
        running kube-apiserver || {
            tail -20 "$DIR/kube-apiserver.log" >&2
            stop
            fail "kube-apiserver exited (log: $DIR/kube-apiserver.log)"
        }
        if [[ "$(KUBECONFIG=$DIR/kubeconfig "$bin/kubectl" get --raw /readyz 2>/dev/null)" == ok ]]; then
            break
        fi
        sleep 0.1
    done
    [[ "$(KUBECONFIG=$DIR/kubeconfig "$bin/kubectl" get --raw /readyz 2>/dev/null)" == ok ]] ||
        {
            stop
            fail "kube-apiserver not ready after 90 s (log: $DIR/kube-apiserver.log)"
        }
    echo "dev-cluster: API server https://127.0.0.1:$port ready in $((SECONDS - start)) s" >&2
    KUBECONFIG=$DIR/kubeconfig "$bin/kubectl" apply --server-side -f "$ROOT/crds/" >&2
    # (kubectl wait fails instead of waiting while a fresh CRD has no conditions yet.)
    for _ in $(seq 600); do
        [[ "$(KUBECONFIG=$DIR/kubeconfig "$bin/kubectl" get crd/rdphealths.rdphealth.io \
            -o 'jsonpath={.status.conditions[?(@.type=="Established")].status}')" == True ]] && break
        sleep 0.1
    done
    echo "dev-cluster: CRD rdphealths.rdphealth.io established" >&2
    echo "dev-cluster: use it with: eval \"\$(scripts/dev-cluster.sh env)\"" >&2
    print_env
}

case "${1:-}" in
up) up ;;
down)
    stop
    rm -rf "$DIR"
    ;;
env)
    running kube-apiserver || fail "not running: start it with scripts/dev-cluster.sh up"
    print_env
    ;;
*)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
