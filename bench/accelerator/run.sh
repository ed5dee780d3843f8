#!/usr/bin/env bash
# The one prepared command for a lent GPU (see run.py's docstring): on the device tool,
#     run(command="bench/accelerator/run.sh", carry=[".whl"], timeout_s=540)
# after bench/accelerator/fetch_wheels.sh here. --dry-run: every part at toy size on the CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" bench/accelerator/run.py "$@"
