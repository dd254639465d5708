"""Entrypoint for `ray job submit --working-dir . -- python jobs/analyze.py --config ray_config.yaml [--set key=value]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, for a job that did not pip install

from apollo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
