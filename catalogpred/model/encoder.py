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
from torch import nn

__all__ = ["SpectrumEncoder", "encoder_flops"]

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
        """Attention-pooled CNN features, float32 [N, 256]."""
        x = y.unsqueeze(1)
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.conv3(x)
        h, a = torch.split(x, [self.n_feature, self.n_feature], dim=1)
        a = torch.softmax(a, dim=-1)
        return torch.sum(h * a, dim=2)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(y))


def encoder_flops(n_pix: int) -> float:
    """Multiply-adds ×2 of one forward pass for input length ``n_pix`` (conv layers dominate)."""
    l1 = n_pix
    l2 = (l1 + 2 * (KERNELS[0] // 2) - KERNELS[0]) // KERNELS[0] + 1
    l3 = (l2 + 2 * (KERNELS[1] // 2) - KERNELS[1]) // KERNELS[1] + 1
    conv = 2 * (l1 * 1 * FILTERS[0] * KERNELS[0] + l2 * FILTERS[0] * FILTERS[1] * KERNELS[1]
                + l3 * FILTERS[1] * FILTERS[2] * KERNELS[2])
    mlp = 2 * (256 * 128 + 128 * 64 + 64 * 32 + 32 * 6)
    return float(conv + mlp)
