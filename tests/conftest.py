from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY = """
experiment = "tiny"
store_root = "{root}"

[synth]
users = 60
items = 40
categories = 4
scenarios = 2
events_per_user = [5, 30]
seed = 1

[tokenize]
format = "synth"
conditions = [
  {{ name = "scenario", source = "column", column = "scenario" }},
  {{ name = "category", source = "item_attr", column = "category" }},
]

[pack]
seq_len = 128
max_items = 30
conditions = {conditions}

[pretrain]
model = {{ preset = "tiny", d_model = 32, n_heads = 2, d_ff = 64 }}
optim = {{ max_steps = {steps}, batch_rows = 4, lr = 3e-3, warmup_steps = 2 }}
eval = {{ every_steps = {every}, condition = {{ scenario = "s0" }}, batch_rows = 8 }}
checkpoint_every = {ckpt}
log_every = 1
"""


@pytest.fixture
def tiny_spec(tmp_path):
    def make(steps=6, every=3, ckpt=2, conditions="true", name="tiny.toml"):
        return write_spec(tmp_path / name, TINY.format(root=tmp_path / "stores", steps=steps, every=every,
                                                        ckpt=ckpt, conditions=conditions))
    return make
