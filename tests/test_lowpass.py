"""The LUM low-pass branch (BSARec's frequency filter, read causally): its kernel against the FFT filter it
stands for, its matrix on packed rows against the filter run on each prefix, and the spec's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lumctl.attention import document_causal_block_mask
from lumctl.errors import InputError
from lumctl.models.lum import LUM, LUMConfig, lowpass_kernel, lowpass_matrix
from lumctl.ops.packing import document_causal_mask
from lumctl.specs import parse_spec


def fft_lowpass_last(x: torch.Tensor, bins: int) -> torch.Tensor:
    """BSARec's low-pass filter over a (W, D) window, its last output (the reference twin)."""
    f = torch.fft.rfft(x, dim=0, norm="ortho")
    f[bins:] = 0
    return torch.fft.irfft(f, n=x.shape[0], dim=0, norm="ortho")[-1]


def test_kernel_by_hand():
    # window 4, 2 bins: (1 + 2 cos(pi d / 2)) / 4 = 3/4, 1/4, -1/4, 1/4
    np.testing.assert_allclose(lowpass_kernel(4, 2).numpy(), [0.75, 0.25, -0.25, 0.25], atol=1e-7)
    np.testing.assert_allclose(lowpass_kernel(5, 1).numpy(), [0.2] * 5, atol=1e-7)  # bin 0 only: the mean


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.data(), st.integers(0, 2**31 - 1))
def test_kernel_is_the_fft_filter_read_at_the_last_position(window, data, seed):
    bins = data.draw(st.integers(1, window // 2))
    x = torch.randn(window, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = lowpass_kernel(window, bins).double()
    causal = (k[:, None] * x.flip(0)).sum(0)   # sum_d k[d] x[W - 1 - d]
    torch.testing.assert_close(causal, fft_lowpass_last(x, bins), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(2, 10), st.data())
def test_matrix_on_packed_rows_is_the_filter_of_each_prefix(lengths, window, data):
    """Token t of a user: the FFT filter over the user's last `window` tokens up to t (zeros before the
    first), whatever else shares the row."""
    bins = data.draw(st.integers(1, window // 2))
    S = sum(lengths) + 2                                     # two padding tokens at the end
    seg = np.concatenate([np.full(n, u) for u, n in enumerate(lengths)] + [np.full(2, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(2, int)])
    x = torch.randn(1, S, 3, dtype=torch.float64)
    mask = torch.from_numpy(document_causal_mask(seg[None]))
    low = lowpass_matrix(torch.from_numpy(pos)[None], mask, lowpass_kernel(window, bins).double()) @ x
    for t in range(sum(lengths)):
        prefix = x[0, (seg == seg[t]) & (np.arange(S) <= t)][-window:]
        padded = torch.cat([torch.zeros(window - len(prefix), 3, dtype=torch.float64), prefix])
        torch.testing.assert_close(low[0, t], fft_lowpass_last(padded, bins), atol=1e-6, rtol=1e-6)


def test_flex_and_dense_masks_give_the_same_model_output():
    """flex passes a BlockMask: the branch builds its document-causal mask from the segments."""
    torch.manual_seed(0)
    m = LUM(LUMConfig(n_items=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, item_proj=False,
                      lowpass_bins=2, lowpass_window=5)).eval()
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, -1]], np.int32)
    b = {"type": torch.tensor([[2, 2, 2, 2, 2, 2, 2, 0]], dtype=torch.int8),
         "item": torch.tensor([[3, 4, 5, 6, 7, 8, 9, 0]]), "cond": torch.zeros(1, 8, 0, dtype=torch.long),
         "pos": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]]), "segment": torch.from_numpy(seg)}
    dense = torch.from_numpy(document_causal_mask(seg))
    with torch.no_grad():
        a = m(b, dense)[0, :7]
        c = m(b, document_causal_block_mask(b["segment"]))[0, :7]
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_a_later_token_never_changes_an_earlier_output():
    torch.manual_seed(1)
    m = LUM(LUMConfig(n_items=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, item_proj=False,
                      lowpass_bins=3, lowpass_window=8)).eval()
    seg = np.zeros((1, 6), np.int32)
    mk = lambda items: {"type": torch.full((1, 6), 2, dtype=torch.int8), "item": torch.tensor([items]),
                        "cond": torch.zeros(1, 6, 0, dtype=torch.long), "pos": torch.arange(6)[None]}
    mask = torch.from_numpy(document_causal_mask(seg))
    with torch.no_grad():
        a, b = m(mk([3, 4, 5, 6, 7, 8]), mask), m(mk([3, 4, 5, 6, 7, 19]), mask)
    torch.testing.assert_close(a[0, :5], b[0, :5])
    assert (a[0, 5] - b[0, 5]).abs().max() > 1e-4


BASE = {"experiment": "t", "tokenize": {"format": "seq-lines", "path": "d.txt"}, "pack": {"conditions": False}}


def test_spec_checks():
    ok = parse_spec({**BASE, "pretrain": {"model": {"lowpass_bins": 3}}})
    assert (ok.pretrain.model.lowpass_bins, ok.pretrain.model.lowpass_window, ok.pretrain.model.lowpass_alpha) == (3, 50, 0.7)
    with pytest.raises(InputError, match="lowpass_bins is a lum option"):
        parse_spec({**BASE, "pretrain": {"model": {"kind": "sasrec", "lowpass_bins": 3}}})
    with pytest.raises(InputError, match="lowpass_window // 2"):
        parse_spec({**BASE, "pretrain": {"model": {"lowpass_bins": 6, "lowpass_window": 10}}})
    with pytest.raises(InputError, match="lowpass_alpha"):
        parse_spec({**BASE, "pretrain": {"model": {"lowpass_bins": 3, "lowpass_alpha": 0.0}}})
