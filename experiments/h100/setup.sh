#!/usr/bin/env bash
# On a GPU machine without a package index (Python 3.12, torch preinstalled, no zarr/pydantic): install the
# carried wheels from .wheels/ and make `lumctl` importable. Source it: `. experiments/h100/setup.sh`
python3 -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | grep -v -i warning
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LUMCTL_DATA=$PWD/.data
python3 -c "import torch, zarr, pydantic, numba; print('torch', torch.__version__, torch.cuda.get_device_name(), 'zarr', zarr.__version__)"
