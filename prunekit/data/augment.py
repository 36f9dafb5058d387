"""Tensor-side augmentation applied to whole batches (no per-sample Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample.

    Parameters
    ----------
    x : Tensor [B, C, H, W]
        A normalised batch (zero padding is the dataset mean after normalisation).
    padding : int
        Pixels of zero padding on each side before the crop; 0 disables cropping.
    flip : bool
        Flip each image horizontally with probability 1/2.
    generator : torch.Generator, optional
        Source of randomness (a CPU generator), for repeatable runs.
    """
    b, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)  # [B, H]
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)  # [B, W]
        bi = torch.arange(b, device=x.device).view(b, 1, 1)
        xp = xp.permute(0, 2, 3, 1)  # [B, H', W', C]
        x = xp[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    # Plain NCHW strides: with one channel, the permuted copy is "contiguous" in both layouts
    # with a channel stride of 1, and torch 2.13's CPU convolution backward corrupts the heap
    # on such an input (double free, seen on this project's CI machines).
    return x.clone(memory_format=torch.contiguous_format)
