#!/usr/bin/env bash
# Makes a Docker Engine and the test base image available: safe to run before every `make test`.
#
# 1. Installs docker.io, debootstrap and docker-compose (Debian's 1.29: the compose file's tests run it)
#    when one is missing.
# 2. Starts dockerd when nothing answers on the socket (--bridge=none --iptables=false: containers get no
#    private-range address; the ones that need the network run with network_mode=host). Log: $DOCKERD_LOG.
# 3. Makes amlrun-base:py3.11 (Debian bookworm minbase with python3, python3-venv, python3-pip) once: no
#    image registry is reachable, so it is built from Debian packages with debootstrap. The root file
#    system is cached as a tarball under $AMLRUN_CACHE/docker, named by the hash of the recipe below, so
#    later runs import it in seconds, and a daemon whose image already carries the recipe's label is left
#    alone.
set -euo pipefail

CACHE=${AMLRUN_CACHE:-$HOME/.cache/amlrun}/docker
SOCKET=/var/run/docker.sock
export DOCKER_HOST=${DOCKER_HOST:-unix://$SOCKET}
DOCKERD_LOG=${DOCKERD_LOG:-$CACHE/dockerd.log}
IMAGE=amlrun-base:py3.11
SUITE=bookworm
# The Debian archive this machine's apt already uses (its first deb URI), unless DEBIAN_MIRROR says otherwise.
apt_mirror() {
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources || true
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list || true; } | awk '{print $2}' |
    grep -v -- '-security' | head -n 1 || true
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
# Changing anything here makes a new cache entry (and a new image label).
RECIPE="debootstrap --variant=minbase --include=$PACKAGES $SUITE; no apt lists; v1"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
TARBALL=$CACHE/amlrun-base-py3.11-$KEY.tar

mkdir -p "$CACHE"
# One runner at a time on this machine: a second `make test` waits instead of building twice.
exec 9>"$CACHE/.docker.sh.lock"
flock 9

say() { echo "docker: $*"; }

daemon_ready() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_packages() {
  local missing=()
  { command -v dockerd && command -v docker; } >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

start_daemon() {
  daemon_ready && return 0
  if [ "$DOCKER_HOST" != "unix://$SOCKET" ]; then
    echo "docker: nothing answers at DOCKER_HOST=$DOCKER_HOST; start that daemon, or unset DOCKER_HOST" >&2
    exit 1
  fi
  say "starting dockerd (log: $DOCKERD_LOG)"
  # setsid: the daemon outlives this script and the make that ran it; 9>&-: it must not hold our lock.
  setsid dockerd --host "unix://$SOCKET" --bridge=none --iptables=false >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
  for _ in $(seq 1 60); do
    daemon_ready && return 0
    sleep 0.5
  done
  echo "docker: dockerd did not answer on $SOCKET within 30 s; see $DOCKERD_LOG" >&2
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  exit 1
}

build_rootfs() {
  local root
  rm -rf "$CACHE"/.rootfs-* "$TARBALL.tmp"  # left by a build that was interrupted (we hold the lock)
  root=$(mktemp -d "$CACHE/.rootfs-XXXXXX")
  chmod 755 "$root"  # mktemp makes it 0700, which would become the image's /
  say "building $IMAGE from Debian packages (debootstrap $SUITE, about a minute)"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    echo "docker: debootstrap failed; see $CACHE/debootstrap.log" >&2
    tail -n 20 "$CACHE/debootstrap.log" >&2
    rm -rf "$root"
    exit 1
  fi
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . >"$TARBALL.tmp"
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$root"
}

ensure_image() {
  local label
  label=$(docker image inspect --format '{{ index .Config.Labels "amlrun.recipe" }}' "$IMAGE" 2>/dev/null || true)
  if [ "$label" = "$KEY" ]; then
    say "$IMAGE ready"
    return 0
  fi
  [ -f "$TARBALL" ] || build_rootfs
  say "importing $IMAGE from $TARBALL"
  docker import \
    --change "LABEL amlrun.recipe=$KEY" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$TARBALL" "$IMAGE" >/dev/null
  say "$IMAGE ready"
}

install_packages
start_daemon
ensure_image
