"""GPU memory of the item embedding table and its AdamW state, per LUM preset, at a catalogue size.

Each preset is built by lumctl's own model code on the meta device (shapes, no memory) with a
Taobao-shaped config; the item table is every parameter with n_items rows. Training holds, in
fp32 (bf16 autocast changes only the compute): the weights, their gradient (dense) and AdamW's two
moments, i.e. 4 copies; validation adds the normalised table (fp32, one more copy).

    python benchmarks/item_table_memory.py --items 4400000          # prints a Markdown table
"""

from __future__ import annotations

import argparse

import torch

from lumctl.models import build
from lumctl.models.lum import PRESETS

GIB = 2**30


def table_memory(preset: str, n_items: int, n_categories: int = 9439, cond_vocab=(6, 9441)) -> dict:
    """Bytes of the item table (weights, + grad + AdamW moments, + eval copy) and of the rest of the model."""
    d, L, H, ff = PRESETS[preset]
    cfg = {"n_items": n_items, "cond_vocab": list(cond_vocab), "n_genres": 0, "n_categories": n_categories,
           "n_popularity": 26, "d_model": d, "n_layers": L, "n_heads": H, "d_ff": ff, "d_feat": 0,
           "dropout": 0.0, "attention": "flex"}
    with torch.device("meta"):
        model = build("lum", cfg)
    table = sum(p.numel() * p.element_size() for p in model.parameters() if p.shape[0] == n_items)
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - table
    return {"preset": preset, "d_model": d, "table": table, "train": 4 * table, "eval_copy": n_items * d * 4,
            "rest_train": 4 * rest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=4_400_000)
    args = ap.parse_args()
    print(f"| preset | d | item table (fp32) | + grad + AdamW moments | + eval's normalised copy | "
          f"rest of the model, trained |")
    print("|---|---|---|---|---|---|")
    for preset in PRESETS:
        m = table_memory(preset, args.items)
        print(f"| {preset} | {m['d_model']} | {m['table'] / GIB:.2f} GiB | {m['train'] / GIB:.2f} GiB | "
              f"{(m['train'] + m['eval_copy']) / GIB:.2f} GiB | {m['rest_train'] / GIB:.2f} GiB |")


if __name__ == "__main__":
    main()
