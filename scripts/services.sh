#!/usr/bin/env bash
# Starts the services the tests talk to, if they are not running yet.
set -euo pipefail

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! pg_ready; then
  if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
fi
pg_ready || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
echo "services: PostgreSQL ready on 127.0.0.1:5432"

# Redis: the CeleryExecutor tests' broker (each test cluster uses a database number of its own).
redis_ready() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! redis_ready; then
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  # Loopback only, nothing persisted: the tests' queues live as long as the machine.
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --logfile /tmp/amlrun-redis.log
  for _ in $(seq 1 30); do redis_ready && break; sleep 1; done
fi
redis_ready || { echo "Redis did not start on 127.0.0.1:6379 (see /tmp/amlrun-redis.log)" >&2; exit 1; }
echo "services: Redis ready on 127.0.0.1:6379"

# sshd and iproute2: the SSH tests start their own sshd in a network namespace they create.
if [ ! -x /usr/sbin/sshd ] || ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server iproute2 util-linux >/dev/null
fi
mkdir -p /run/sshd
echo "services: sshd and iproute2 installed"

# xfsprogs: a test materializes run directories on an XFS image (which can clone files) it mounts itself.
if ! command -v mkfs.xfs >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null
fi
echo "services: xfsprogs installed"

# socat: a test puts TLS in front of the Docker Engine's socket, as a daemon started with --tlsverify listens.
if ! command -v socat >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null
fi
echo "services: socat installed"

# Docker Engine and the test base image (installs and starts them when missing).
"$(dirname "$0")/docker.sh"

# Java: spark-submit and the standalone Spark master and worker the Spark tests start (pyspark itself comes
# with the dev dependencies).
if ! command -v java >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi
echo "services: Java $(java -version 2>&1 | head -n 1)"

# Chromium: the UI's browser tests (tests/browser) drive it through playwright, which cannot download its own.
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "services: $(/usr/bin/chromium --version 2>/dev/null || echo 'Chromium missing')"
