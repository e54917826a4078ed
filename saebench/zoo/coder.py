"""A zoo dictionary as plain tensors and the equations every zoo format shares.

One `Coder` covers an SAE, a transcoder (with or without a skip connection), a set of
per-layer transcoders and a cross-layer transcoder: source `i` reads `reads[i]`, output `j`
writes `writes[j]` (source `i`'s own target is output `i`), and

    f_i   = act((x_i - pre_bias_i) @ W_enc_i + b_enc_i)       act: ReLU, then top-k if k
    out_j = f_j @ W_dec[j, j] + b_dec_j + sum_{i<j} f_i @ W_dec[i, j] + x_j @ W_skip_j.T

The zoo trains on this form (float32) and the quality numbers are measured on it (float64),
so every on-disk format is written from it and read back into it (`saebench.zoo.formats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Coder:
    """Tensors of one dictionary: `W_enc[i]` [d_in, d_sae], `W_dec[(i, j)]` [d_sae, d_out]
    (source i into output j, i <= j), `b_dec[j]`, and per source an optional `pre_bias`
    (an SAE's decoder bias, subtracted before encoding) and per output an optional `W_skip`
    [d_out, d_in]."""

    reads: list[str]
    writes: list[str]
    W_enc: list[Tensor]
    b_enc: list[Tensor]
    W_dec: dict[tuple[int, int], Tensor]
    b_dec: list[Tensor]
    pre_bias: list[Tensor | None]
    W_skip: list[Tensor | None]
    k: int | None = None

    def encode(self, i: int, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of source `i` for its input `x` [..., d_in]."""
        if self.pre_bias[i] is not None:
            x = x - self.pre_bias[i]
        acts = torch.relu(x @ self.W_enc[i] + self.b_enc[i])
        if self.k is None:
            return acts
        top = acts.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, top.indices, top.values)

    def decode(self, j: int, feats: Sequence[Tensor], xs: Sequence[Tensor]) -> Tensor:
        """Output `j` from the features of sources 0..j (and input j, for a skip term)."""
        out = feats[j] @ self.W_dec[(j, j)] + self.b_dec[j]
        for i in range(j):
            if (i, j) in self.W_dec:
                out = out + feats[i] @ self.W_dec[(i, j)]
        if self.W_skip[j] is not None:
            out = out + xs[j] @ self.W_skip[j].T
        return out

    def reconstruct(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Every output from every source's input (all inputs from one run)."""
        feats = [self.encode(i, x) for i, x in enumerate(xs)]
        return [self.decode(j, feats, xs) for j in range(len(self.writes))]

    def targets(self, i: int) -> list[int]:
        """The outputs source `i` writes to, in order."""
        return [j for j in range(len(self.writes)) if (i, j) in self.W_dec]

    def decoder_norms(self, i: int) -> Tensor:
        """Decoder norm [d_sae] of each feature of source `i`, summed over its outputs."""
        return sum(self.W_dec[(i, j)].norm(dim=1) for j in self.targets(i))

    def parameters(self) -> list[Tensor]:
        """Every distinct tensor (the optimiser's parameters while training)."""
        tensors = [*self.W_enc, *self.b_enc, *self.W_dec.values(), *self.b_dec,
                   *(t for t in (*self.pre_bias, *self.W_skip) if t is not None)]
        return list({id(t): t for t in tensors}.values())

    def to(self, dtype: torch.dtype) -> Coder:
        """A detached copy in `dtype`."""
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dtype)

        return Coder(list(self.reads), list(self.writes), [cast(t) for t in self.W_enc],
                     [cast(t) for t in self.b_enc],
                     {key: cast(t) for key, t in self.W_dec.items()},
                     [cast(t) for t in self.b_dec], [cast(t) for t in self.pre_bias],
                     [cast(t) for t in self.W_skip], self.k)
