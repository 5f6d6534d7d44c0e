"""spender-compatible spectrum encoder (architecture of spender 0.3's ``SpectrumEncoder``).

Written from the published description (Melchior et al. 2023; Liang et al. 2023;
MODEL.md); no spender code is copied. Module names and indices follow spender's,
so a checkpoint's ``encoder.*`` state dict loads into :class:`SpectrumEncoder`
after stripping the ``encoder.`` prefix (dropout layers, which hold no weights,
are replaced by identities at the same positions).

Shapes (SDSS, L = 3921): [N, L] → conv1 [N,128,L] → pool5 [N,128,785] → conv2 [N,256,785]
→ pool11 [N,256,72] → conv3 [N,512,72] → split h, a [N,256,72] → Σ_λ h·softmax(a) [N,256]
→ MLP 256→128→64→32→S.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SpectrumEncoder", "encoder_flops", "features_conv", "features_gemm", "features_nhwc"]

FILTERS = (128, 256, 512)
KERNELS = (5, 11, 21)
HIDDEN = (128, 64, 32)


def _conv_block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    # indices 0 conv, 1 norm, 2 PReLU, 3 dropout (identity here), as in spender
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=k, padding=k // 2),
        nn.InstanceNorm1d(c_out),
        nn.PReLU(c_out),
        nn.Identity(),
    )


class SpectrumEncoder(nn.Module):
    """Encode normalised spectra into ``n_latent`` latents.

    Parameters
    ----------
    n_latent : int
        Latent size S (6 for spender's sdss_II and desi_edr_galaxy).
    n_pix : int
        Input length L (3921 SDSS, 7781 DESI); recorded for checks only.

    Forward
    -------
    y : float32 [N, L]
        Flux divided by the spender normalisation (dimensionless), masked pixels as they are.
    returns : float32 [N, S]
    """

    def __init__(self, n_latent: int = 6, n_pix: int = 3921):
        super().__init__()
        self.n_latent = n_latent
        self.n_pix = n_pix
        self.conv1 = _conv_block(1, FILTERS[0], KERNELS[0])
        self.conv2 = _conv_block(FILTERS[0], FILTERS[1], KERNELS[1])
        self.conv3 = _conv_block(FILTERS[1], FILTERS[2], KERNELS[2])
        self.pool1 = nn.MaxPool1d(KERNELS[0], padding=KERNELS[0] // 2)
        self.pool2 = nn.MaxPool1d(KERNELS[1], padding=KERNELS[1] // 2)
        self.n_feature = FILTERS[-1] // 2
        layers: list[nn.Module] = []
        sizes = [self.n_feature, *HIDDEN, n_latent]
        for i in range(len(sizes) - 1):
            last = i == len(sizes) - 2
            # indices 3i linear, 3i+1 activation, 3i+2 dropout (identity), as in spender's MLP
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Identity() if last else nn.PReLU(sizes[i + 1]), nn.Identity()]
        self.mlp = nn.Sequential(*layers)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Attention-pooled CNN features, float32 [N, 256] (:func:`features_conv` in float32)."""
        return features_conv(self, y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(y))


# ---------------------------------------------------------------------------------------- fast paths
#
# Three implementations of the same function (`SpectrumEncoder.features`), chosen per GPU by timing
# (catalogpred.model.bundle): the module's 1-D convolutions, convolutions as matrix products, and 2-D
# convolutions in channels-last format. With ``bf16=True`` all three run the same mixed precision:
# conv2 and conv3 (99.5 % of the FLOPs) in bfloat16, and conv1, every InstanceNorm, PReLU, pooling and
# the attention in float32. conv1 sees the spectrum itself: rounding the flux to bfloat16 (0.4 % per
# pixel) there is what makes a plain bf16 autocast pass err by ~0.5-2 % in the latents (measured).


def _autocast(y: torch.Tensor, enabled: bool):
    return torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=enabled)


def _attend(x: torch.Tensor, n_feature: int, channels: int, length: int) -> torch.Tensor:
    """Attention pooling: channels split into values h and scores a; Σ_λ h · softmax_λ(a)."""
    h, a = torch.split(x, [n_feature, n_feature], dim=channels)
    return torch.sum(h * torch.softmax(a, dim=length), dim=length)


def features_conv(encoder: SpectrumEncoder, y: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """:meth:`SpectrumEncoder.features` with the module's layers (cuDNN / oneDNN 1-D convolutions)."""
    x = encoder.pool1(encoder.conv1(y.unsqueeze(1)))
    for block, pool in ((encoder.conv2, encoder.pool2), (encoder.conv3, None)):
        if bf16:
            with _autocast(y, True):
                x = block[0](x).float()
            x = block[2](block[1](x))
        else:
            x = block(x)
        x = pool(x) if pool is not None else x
    return _attend(x, encoder.n_feature, channels=1, length=2)


def _block_gemm(block: nn.Sequential, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One conv block (conv, InstanceNorm, PReLU) on channels-last ``x`` [N, L, C_in] → [N, L, C_out].

    The convolution is one matrix product of the unfolded input ([N·L, C_in·k], im2col) with the
    weights [C_in·k, C_out]; normalisation and PReLU in float32.
    """
    conv, prelu = block[0], block[2]
    k, p = conv.kernel_size[0], conv.padding[0]
    n, length, c_in = x.shape
    cols = F.pad(x, (0, 0, p, p)).unfold(1, k, 1)  # [N, L, C_in, k] (a view)
    w = conv.weight.reshape(conv.out_channels, c_in * k)  # (c, k) order, as cols
    with _autocast(x, bf16):
        h = torch.addmm(conv.bias, cols.reshape(n * length, c_in * k), w.t())
    h = h.float().view(n, length, -1)
    var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)
    h = (h - mean) * torch.rsqrt(var + block[1].eps)
    return torch.where(h >= 0, h, prelu.weight * h)


def _pool_gemm(x: torch.Tensor, k: int) -> torch.Tensor:
    """MaxPool1d(k, stride k, padding k // 2) over L of channels-last ``x`` [N, L, C] (no indices)."""
    p = k // 2
    n_out = (x.shape[1] + 2 * p - k) // k + 1
    xp = F.pad(x, (0, 0, p, p), value=float("-inf"))[:, :n_out * k]
    return xp.reshape(x.shape[0], n_out, k, x.shape[2]).amax(dim=2)


def features_gemm(encoder: SpectrumEncoder, y: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """:meth:`SpectrumEncoder.features` computed channels-last, each convolution as one matrix product.

    Uses more memory (the unfolded inputs: [N·785, 1408] for conv2 on the SDSS grid).
    """
    x = y.unsqueeze(2)  # [N, L, 1]
    x = _pool_gemm(_block_gemm(encoder.conv1, x, False), KERNELS[0])
    x = _pool_gemm(_block_gemm(encoder.conv2, x, bf16), KERNELS[1])
    x = _block_gemm(encoder.conv3, x, bf16)  # [N, L3, 512]
    return _attend(x, encoder.n_feature, channels=2, length=1)


def features_nhwc(encoder: SpectrumEncoder, y: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """:meth:`SpectrumEncoder.features` with 2-D convolutions on [N, C, 1, L] in channels-last memory format.

    cuDNN's tensor-core kernels are NHWC kernels, and PyTorch has no channels-last layout for 3-D
    tensors: this is the way to reach them from a 1-D model.
    """
    x = y[:, None, None, :].contiguous(memory_format=torch.channels_last)  # [N, 1, 1, L]
    for i, (block, pool) in enumerate(((encoder.conv1, KERNELS[0]), (encoder.conv2, KERNELS[1]),
                                       (encoder.conv3, None))):
        conv = block[0]
        w = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        with _autocast(y, bf16 and i > 0):
            h = F.conv2d(x, w, conv.bias, padding=(0, conv.padding[0]))
        h = h.float()
        var, mean = torch.var_mean(h, dim=(2, 3), keepdim=True, correction=0)
        h = F.prelu((h - mean) * torch.rsqrt(var + block[1].eps), block[2].weight)
        x = F.max_pool2d(h, (1, pool), (1, pool), (0, pool // 2)) if pool else h
    return _attend(x[:, :, 0, :], encoder.n_feature, channels=1, length=2)


def encoder_flops(n_pix: int) -> float:
    """Multiply-adds ×2 of one forward pass for input length ``n_pix`` (conv layers dominate)."""
    l1 = n_pix
    l2 = (l1 + 2 * (KERNELS[0] // 2) - KERNELS[0]) // KERNELS[0] + 1
    l3 = (l2 + 2 * (KERNELS[1] // 2) - KERNELS[1]) // KERNELS[1] + 1
    conv = 2 * (l1 * 1 * FILTERS[0] * KERNELS[0] + l2 * FILTERS[0] * FILTERS[1] * KERNELS[1]
                + l3 * FILTERS[1] * FILTERS[2] * KERNELS[2])
    mlp = 2 * (256 * 128 + 128 * 64 + 64 * 32 + 32 * 6)
    return float(conv + mlp)
