#!/usr/bin/env bash
# Download the peers the GPU image lacks (Liger-Kernel, TRL and what TRL imports that the image
# does not have) as wheels into .whl/, for a machine with no network:
#
#   bash benchmarks/gpu_wheels.sh            # here, with PyPI reachable
#   # then carry .whl to the GPU machine; benchmarks/gpu_run.sh installs them into /tmp/site
#
# Pinned to the versions the CPU suite is tested with; the image's python is 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    liger-kernel==0.8.5 trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
