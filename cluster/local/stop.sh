#!/usr/bin/env bash
# Ends the cluster cluster/local/start.sh started (the processes it recorded, nothing else) and removes its temp dir
# and cluster/local/.env.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
exec "$python" -m apollo_ray.localcluster stop --env-file "$here/.env" "$@"
