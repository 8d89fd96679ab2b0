"""lumctl — the Large User Model (LUM) three-step paradigm as a toolchain.

Stages: tokenize -> pack -> pretrain -> query -> fuse -> eval. Each stage reads and writes
Zarr stores under `stores/<experiment>/<stage>/`; see README.md and docs/.
"""

__version__ = "0.1.0"
