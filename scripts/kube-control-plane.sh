#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the end-to-end tests: etcd, kube-apiserver and
# kube-controller-manager (plus a kubectl of the same version).
#
#   scripts/kube-control-plane.sh build   # build once, cache outside the work tree; print the bin dir
#   scripts/kube-control-plane.sh bindir  # print the bin dir (fails when nothing is built)
#   scripts/kube-control-plane.sh start DIR  # start etcd, kube-apiserver, kube-controller-manager
#   scripts/kube-control-plane.sh stop DIR   # stop them, by the PIDs written in DIR
#
# `start` takes its ports from ETCD_PORT, ETCD_PEER_PORT and APISERVER_PORT (defaults 23790,
# 23800, 26443) and, with OWNER_PID set, stops the control plane when that process exits (the
# test binaries set it, so a killed test leaves nothing behind; DIR goes too unless
# BACKFLOW_KEEP_E2E is set). It writes into DIR:
#   admin.kubeconfig     user `admin` in system:masters
#   operator.kubeconfig  user system:serviceaccount:backflow-system:backflow-operator (config/default's
#                        operator ServiceAccount), by a static token
#   tokens.csv           the --token-auth-file; run pods use the tokens that the controller
#                        manager's token controller writes into each ServiceAccount's Secret
#   *.log, *.pid
#
# There is no container runtime on these machines, so kind, k3s and envtest downloads are out.
# Debian bookworm's `kubernetes` source package is the full upstream tree with vendor/; Go from
# `golang-go` builds it in GOPATH mode. The vendored github.com/modern-go/reflect2 1.0.1 crashes
# the API server on Go >= 1.18 (SIGSEGV in map iteration in the CRD handler), so the build swaps
# in the sources of Debian's golang-github-modern-go-reflect2-dev (1.0.2). etcd comes from
# `etcd-server`.
#
# The binaries are cached in $BACKFLOW_KUBE_CACHE (default /var/cache/backflow/kube-<version>),
# so only a fresh machine pays the build (~10 minutes on 2 cores). Every failure is loud: the
# script exits non-zero with the step that failed; it never skips.
#
# The tests (tests/support/cluster.rs) call `start` once per test binary, each on its own ports
# and directory.
set -euo pipefail

KUBE_DEB_VERSION=${KUBE_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}
KUBE_VERSION=${KUBE_VERSION:-v1.20.2}
CACHE=${BACKFLOW_KUBE_CACHE:-/var/cache/backflow/kube-${KUBE_VERSION}-${KUBE_DEB_VERSION##*-}}
BINARIES=(kube-apiserver kube-controller-manager kubectl)

log() { printf 'kube-control-plane: %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

built() {
  local b
  for b in "${BINARIES[@]}" etcd; do [ -x "$CACHE/bin/$b" ] || return 1; done
}

apt_updated=
apt_install() { # packages...
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then apt-get update -qq || die "apt-get update"; apt_updated=1; fi
  log "installing ${missing[*]}"
  # policy-rc.d keeps etcd-server's maintainer scripts from starting a system etcd.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { rm -f /usr/sbin/policy-rc.d; die "apt-get install ${missing[*]}"; }
  rm -f /usr/sbin/policy-rc.d
}

ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    log "adding a deb-src entry for bookworm"
    cat > /etc/apt/sources.list.d/backflow-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=
  fi
}

build() {
  if built; then echo "$CACHE/bin"; return 0; fi
  local started=$SECONDS
  apt_install golang-go golang-github-modern-go-reflect2-dev etcd-server dpkg-dev make curl openssl
  ensure_deb_src
  if [ -z "$apt_updated" ]; then apt-get update -qq || die "apt-get update"; apt_updated=1; fi

  work=$(mktemp -d "${TMPDIR:-/tmp}/backflow-kube-build.XXXXXX")
  chmod 755 "$work" # apt-get source downloads as _apt
  trap 'rm -rf "$work"' EXIT
  log "fetching the kubernetes source package $KUBE_DEB_VERSION"
  (cd "$work" && apt-get source --download-only "kubernetes=$KUBE_DEB_VERSION" >/dev/null) \
    || die "apt-get source kubernetes=$KUBE_DEB_VERSION (is the deb-src entry for bookworm reachable?)"
  (cd "$work" && dpkg-source --no-check -x ./*.dsc src >/dev/null) || die "dpkg-source -x"
  local tree=$work/src
  [ -d "$tree/vendor/github.com/modern-go/reflect2" ] || die "no vendored reflect2 in the source tree"
  local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$reflect2" ] || die "golang-github-modern-go-reflect2-dev has no sources at $reflect2"
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r "$reflect2" "$tree/vendor/github.com/modern-go/reflect2"

  mkdir -p "$work/go/src/k8s.io"
  ln -s "$tree" "$work/go/src/k8s.io/kubernetes"
  log "building ${BINARIES[*]} (about 10 minutes on 2 cores)"
  (
    cd "$work/go/src/k8s.io/kubernetes"
    export GOPATH=$work/go GO111MODULE=off CGO_ENABLED=0 GOCACHE=$work/gocache
    export KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=0000000000000000000000000000000000000000
    local what="" b
    for b in "${BINARIES[@]}"; do what="$what cmd/$b"; done
    make WHAT="${what# }" >"$work/build.log" 2>&1
  ) || { tail -40 "$work/build.log" >&2; die "make WHAT=cmd/kube-apiserver ... (log above)"; }

  mkdir -p "$CACHE/bin.new"
  local b out
  for b in "${BINARIES[@]}"; do
    out=$(find "$tree/_output" -type f -name "$b" -perm -u+x | head -1)
    [ -n "$out" ] || die "the build left no $b"
    cp "$out" "$CACHE/bin.new/$b"
  done
  ln -sf /usr/bin/etcd "$CACHE/bin.new/etcd"
  rm -rf "$CACHE/bin" && mv "$CACHE/bin.new" "$CACHE/bin"
  "$CACHE/bin/kube-apiserver" --version >&2 || die "the built kube-apiserver does not run"
  log "built in $((SECONDS - started)) s into $CACHE/bin"
  echo "$CACHE/bin"
}

wait_http() { # name, url, seconds, [curl args...]
  local name=$1 url=$2 seconds=$3; shift 3
  local i
  for ((i = 0; i < seconds * 5; i++)); do
    if curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$name did not answer $url within ${seconds}s (see $DIR/$name.log: $(tail -5 "$DIR/$name.log" 2>/dev/null | tr '\n' ' '))"
}

kubeconfig() { # file, user, token
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: backflow-e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $DIR/pki/ca.crt
contexts:
- name: backflow-e2e
  context: {cluster: backflow-e2e, user: $2, namespace: default}
current-context: backflow-e2e
users:
- name: $2
  user: {token: $3}
KC
}

start() {
  DIR=${1:?usage: start DIR}
  mkdir -p "$DIR/pki" "$DIR/etcd"
  DIR=$(cd "$DIR" && pwd)
  local bin; bin=$(bindir_or_die)
  ETCD_PORT=${ETCD_PORT:-23790} ETCD_PEER_PORT=${ETCD_PEER_PORT:-23800} APISERVER_PORT=${APISERVER_PORT:-26443}
  command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
  command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

  # A CA and the apiserver's serving certificate for 127.0.0.1 and localhost, so clients verify it.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=backflow-e2e-ca \
    -keyout "$DIR/pki/ca.key" -out "$DIR/pki/ca.crt" >/dev/null 2>&1 || die "openssl: CA"
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
    -keyout "$DIR/pki/apiserver.key" -out "$DIR/pki/apiserver.csr" >/dev/null 2>&1 || die "openssl: serving key"
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > "$DIR/pki/apiserver.ext"
  openssl x509 -req -in "$DIR/pki/apiserver.csr" -CA "$DIR/pki/ca.crt" -CAkey "$DIR/pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$DIR/pki/apiserver.ext" -out "$DIR/pki/apiserver.crt" >/dev/null 2>&1 || die "openssl: serving certificate"
  openssl genrsa -out "$DIR/pki/sa.key" 2048 >/dev/null 2>&1 || die "openssl: service-account key"
  openssl rsa -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub" >/dev/null 2>&1 || die "openssl: service-account public key"

  local admin operator
  admin=$(openssl rand -hex 16) operator=$(openssl rand -hex 16)
  {
    echo "$admin,admin,admin,\"system:masters\""
    echo "$operator,system:serviceaccount:backflow-system:backflow-operator,operator,\"system:serviceaccounts,system:serviceaccounts:backflow-system,system:authenticated\""
  } > "$DIR/tokens.csv"
  kubeconfig "$DIR/admin.kubeconfig" admin "$admin"
  kubeconfig "$DIR/operator.kubeconfig" backflow "$operator"

  "$bin/etcd" --name default --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync \
    >"$DIR/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
  wait_http etcd "http://127.0.0.1:$ETCD_PORT/health" 30

  start_apiserver "$DIR"
  "$bin/kube-controller-manager" --kubeconfig "$DIR/admin.kubeconfig" \
    --leader-elect=false --port=0 --secure-port=0 --use-service-account-credentials=false \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/ca.crt" \
    --controllers='*' --concurrent-gc-syncs=5 >"$DIR/kube-controller-manager.log" 2>&1 &
  echo $! > "$DIR/kube-controller-manager.pid"

  if [ -n "${OWNER_PID:-}" ]; then
    # Detached from the caller's stdio, so the caller's pipes close when it exits.
    # BACKFLOW_KEEP_E2E=1 keeps DIR (logs, etcd data) for a look afterwards.
    nohup setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"; [ -n "$4" ] || rm -rf "$3"' \
      watchdog "$OWNER_PID" "$0" "$DIR" "${BACKFLOW_KEEP_E2E:-}" >/dev/null 2>&1 &
  fi
  log "up: https://127.0.0.1:$APISERVER_PORT (etcd 127.0.0.1:$ETCD_PORT), files in $DIR"
}

# (Re)starts kube-apiserver alone, on the ports and files of an earlier `start`.
start_apiserver() {
  DIR=$(cd "${1:?usage: start-apiserver DIR}" && pwd)
  local bin; bin=$(bindir_or_die)
  local port; port=$(sed -n 's|.*server: https://127.0.0.1:\([0-9]*\)|\1|p' "$DIR/admin.kubeconfig")
  APISERVER_PORT=${APISERVER_PORT:-$port}
  ETCD_PORT=${ETCD_PORT:-$(sed -n 's|.*--listen-client-urls http://127.0.0.1:\([0-9]*\).*|\1|p' "$DIR/etcd.args" 2>/dev/null)}
  echo "--listen-client-urls http://127.0.0.1:$ETCD_PORT" > "$DIR/etcd.args"
  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" --insecure-port 0 \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" --cert-dir "$DIR/pki" \
    --authorization-mode RBAC --token-auth-file "$DIR/tokens.csv" --anonymous-auth=false \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --enable-admission-plugins NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota \
    >>"$DIR/kube-apiserver.log" 2>&1 &
  echo $! > "$DIR/kube-apiserver.pid"
  local token; token=$(sed -n 's/ *user: {token: \(.*\)}/\1/p' "$DIR/admin.kubeconfig")
  wait_http kube-apiserver "https://127.0.0.1:$APISERVER_PORT/readyz" 90 \
    --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $token"
}

stop_pid() { # dir, name
  local file=$1/$2.pid pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop() {
  local dir=${1:?usage: stop DIR}
  stop_pid "$dir" kube-controller-manager
  stop_pid "$dir" kube-apiserver
  stop_pid "$dir" etcd
}

bindir_or_die() {
  built || die "no control plane binaries in $CACHE/bin: run $0 build"
  echo "$CACHE/bin"
}

case "${1:-}" in
  build) build ;;
  bindir) bindir_or_die ;;
  start) start "${2:-}" ;;
  start-apiserver) start_apiserver "${2:-}" ;;
  stop) stop "${2:-}" ;;
  stop-apiserver) stop_pid "${2:?usage: stop-apiserver DIR}" kube-apiserver ;;
  *) echo "usage: $0 build|bindir|start DIR|stop DIR|start-apiserver DIR|stop-apiserver DIR" >&2; exit 2 ;;
esac
