"""SURM's layer: a sum of circulant x skew-circulant products, applied by FFT."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


def circulant_apply(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C(g) x for each row x of `x` (.., n), C(g) the circulant with first column g: the circular convolution
    g * x = ifft(fft(g) fft(x)). `g` may be (r, n) against x (.., r, n)."""
    n = x.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(g, n=n) * torch.fft.rfft(x, n=n), n=n)


def skew_circulant_apply(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S(h) x, S(h) the skew-circulant with first column h (S[i, j] = h[i - j], -h[n + i - j] above the diagonal):
    S(h) = W^-1 C(W h) W with W = diag(w^k), w = exp(i pi / n) (a root of -1), so an FFT product as well."""
    n = x.shape[-1]
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    w = torch.exp(1j * math.pi * torch.arange(n, dtype=torch.float64, device=x.device) / n).to(cdtype)
    y = torch.fft.ifft(torch.fft.fft(h * w) * torch.fft.fft(x * w))
    return (y / w).real


def _ldr_apply(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, n_in: int) -> torch.Tensor:
    """sum_i C(g_i) S(h_i) x on x zero-padded from `n_in` to n, one term at a time (r times less memory than
    broadcasting over the terms). The transforms shared by the terms are done once: fft(W x) going in, and the sum
    stays in the frequency domain until one inverse transform at the end (about 2x fewer FFTs than applying
    `circulant_apply(g_i, skew_circulant_apply(h_i, x))` term by term, which the tests check it equals)."""
    n = g.shape[-1]
    xp = torch.nn.functional.pad(x, (0, n - n_in))
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    w = torch.exp(1j * math.pi * torch.arange(n, dtype=torch.float64, device=x.device) / n).to(cdtype)
    u = torch.fft.fft(xp * w)
    acc = None
    for gi, hi in zip(g, h, strict=True):
        s_x = (torch.fft.ifft(torch.fft.fft(hi * w) * u) / w).real  # S(h_i) x
        term = torch.fft.rfft(gi, n=n) * torch.fft.rfft(s_x, n=n)  # the spectrum of C(g_i) S(h_i) x
        acc = term if acc is None else acc + term
    return torch.fft.irfft(acc, n=n)


class SurmLayer(MethodLayer):
    """ΔW x = scale sum_i C(g_i) S(h_i) x on x zero-padded to n = max(in, out), cut to the first `out` entries."""

    adapter_layer_names = ("surm_g", "surm_h")
    other_param_names = ("surm_scale",)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        if not hasattr(self, "surm_g"):
            self.surm_g = nn.ParameterDict({})
            self.surm_h = nn.ParameterDict({})
            self.surm_scale: dict[str, float] = {}
        n = max(self.in_features, self.out_features)
        device = self.base_weight().device
        gen = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        self.surm_g[adapter_name] = nn.Parameter(torch.zeros(config.r, n, device=device))
        self.surm_h[adapter_name] = nn.Parameter((torch.randn(config.r, n, generator=gen) * 0.02).to(device))
        self.surm_scale[adapter_name] = config.scale if config.scale is not None else 1.0 / n
        self.set_adapter(self.active_adapters)

    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        g, h = self.surm_g[adapter], self.surm_h[adapter]
        x = x.to(g.dtype)
        if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad):
            # recomputed in the backward pass: kept for it, every layer's FFT products would hold several
            # tokens x r x n complex tensors (200 MB each on SmolLM2 at 4 x 256 tokens, r 16, n 1536); a smoke
            # run of the benchmark that kept them died without a message (surm only; the other adapters ran)
            y = torch.utils.checkpoint.checkpoint(_ldr_apply, g, h, x, self.in_features, use_reentrant=False)
        else:
            y = _ldr_apply(g, h, x, self.in_features)
        return self.surm_scale[adapter] * y[..., : self.out_features]

    def adapter_delta(self, adapter: str) -> Any:
        """ΔW as a dense matrix (full rank in general): the update applied to the identity."""
        from lowrank_compress.adapter_kinds import AdapterDelta

        with torch.no_grad():
            eye = torch.eye(self.in_features, device=self.surm_g[adapter].device)
            dense = self.update(eye, adapter).T.float().cpu()
        return AdapterDelta(torch.zeros(0, self.in_features), torch.zeros(self.out_features, 0), dense=dense)
