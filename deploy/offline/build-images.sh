#!/usr/bin/env bash
# Builds the images docker-compose.yaml runs, where no image registry can be reached (this project's
# machines), and prints the variables that point the compose file at them:
#
#   deploy/offline/build-images.sh >offline.env && docker-compose --env-file offline.env up -d
#
# Everything starts from amlrun-base:py3.11, which scripts/docker.sh makes from Debian packages: Airflow
# (airflow.Dockerfile, shaped like apache/airflow, then the repository's own Dockerfile on top of it), and
# stand-ins for the postgres and redis images and the example SSH target's base. Each image is tagged by the
# hash of its recipe (its Dockerfile, the files it copies, the image it starts from), so a later run finds
# it with one lookup and builds nothing; a new recipe's build removes the older tags of that image. pip and
# uv inside the builds reach PyPI on the host's network, trusting the host's CA bundle (the registries may
# sit behind a TLS proxy). Build logs: $AMLRUN_CACHE/docker/compose-*.log.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/deploy/offline
BASE=amlrun-base:py3.11
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
CACHE=${AMLRUN_CACHE:-$HOME/.cache/amlrun}/docker

say() { echo "compose images: $*" >&2; }

"$REPO/scripts/docker.sh" >&2
mkdir -p "$CACHE"
# One builder at a time on this machine: a second run waits, then finds the images.
exec 9>"$CACHE/.compose-images.lock"
flock 9

# The hash of the arguments: file names (their contents, under their names) and plain words.
recipe_key() {
  local item
  for item in "$@"; do
    if [ -f "$item" ]; then
      printf '%s %s\n' "${item#"$REPO"/}" "$(sha256sum <"$item" | cut -c1-64)"
    else
      printf '%s\n' "$item"
    fi
  done | sha256sum | cut -c1-16
}

# build NAME KEY DOCKER-BUILD-ARGUMENTS...: prints NAME:KEY, built unless the daemon already has it.
build() {
  local name=$1 key=$2 log
  shift 2
  log=$CACHE/compose-${name#amlrun-compose-}.log
  if ! docker image inspect "$name:$key" >/dev/null 2>&1; then
    say "building $name:$key (log: $log)"
    if ! docker build --network host --label "amlrun.recipe=$key" -t "$name:$key" "$@" >"$log" 2>&1; then
      echo "compose images: building $name failed; the end of $log:" >&2
      tail -n 30 "$log" >&2
      exit 1
    fi
    # Older recipes of this image; one still used by a container stays until that container is removed.
    docker images --format '{{.Repository}}:{{.Tag}}' "$name" | grep -vx "$name:$key" |
      xargs -r docker rmi >/dev/null 2>&1 || true
  fi
  say "$name:$key ready"
  echo "$name:$key"
}

base_key=$(docker image inspect --format '{{ index .Config.Labels "amlrun.recipe" }}' "$BASE")
[ -n "$base_key" ] || base_key=$(docker image inspect --format '{{.Id}}' "$BASE")

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$HERE/airflow.Dockerfile" "$context/Dockerfile"
cp "$CA_BUNDLE" "$context/ca-certificates.crt"
airflow_base=$(build amlrun-compose-airflow-base \
  "$(recipe_key "$base_key" "$HERE/airflow.Dockerfile" "$CA_BUNDLE")" \
  --build-arg "BASE_IMAGE=$BASE" "$context")

# The package as the repository's Dockerfile copies it (its .dockerignore lets in nothing else).
mapfile -t package < <(find "$REPO/airflow_amlrun" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | sort)
airflow=$(build amlrun-compose-airflow \
  "$(recipe_key "$airflow_base" "$REPO/Dockerfile" "$REPO/.dockerignore" "$REPO/pyproject.toml" "$REPO/hatch_build.py" \
    "$REPO/README.md" "${package[@]}")" \
  --build-arg "AIRFLOW_BASE_IMAGE=$airflow_base" "$REPO")

postgres=$(build amlrun-compose-postgres \
  "$(recipe_key "$base_key" "$HERE/postgres.Dockerfile" "$HERE/postgres-entrypoint.sh")" \
  --build-arg "BASE_IMAGE=$BASE" -f "$HERE/postgres.Dockerfile" "$HERE")

redis=$(build amlrun-compose-redis "$(recipe_key "$base_key" "$HERE/redis.Dockerfile")" \
  --build-arg "BASE_IMAGE=$BASE" -f "$HERE/redis.Dockerfile" "$HERE")

ssh_target=$(build amlrun-compose-ssh-target \
  "$(recipe_key "$base_key" "$REPO/deploy/ssh-target/Dockerfile" "$REPO/deploy/ssh-target/sshd_config")" \
  --build-arg "BASE_IMAGE=$BASE" "$REPO/deploy/ssh-target")

cat <<EOF
AIRFLOW_IMAGE=$airflow
POSTGRES_IMAGE=$postgres
REDIS_IMAGE=$redis
SSH_TARGET_IMAGE=$ssh_target
EOF
