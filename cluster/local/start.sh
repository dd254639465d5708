#!/usr/bin/env bash
# A real two-node Ray cluster on this machine (token authentication on), plus SeaweedFS S3 and MLflow, all on
# 127.0.0.1 and free ports. Writes cluster/local/.env: `source cluster/local/.env`, then e.g.
#   ray job submit --working-dir . -- python jobs/collect.py --config ray_config.yaml \
#       --set storage.root=s3://apollo/runs --set tracking.uri=$MLFLOW_TRACKING_URI
# cluster/local/stop.sh ends everything this started. Options: --num-cpus N (per node), --no-services.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
exec "$python" -m apollo_ray.localcluster start --env-file "$here/.env" "$@"
