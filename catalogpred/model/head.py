"""IR head: latents + redshift + normalisation → mean and σ of WISE W1–W4 (Vega mag).

A heteroscedastic Gaussian MLP (extends Jespersen et al. 2025, whose head gives the
mean only). Inputs are standardised with constants fitted on the training set and
stored as buffers, so a saved head is self-contained.

Input features, float32 [N, S + 2]: the S latents, z, and log10(norm / (1e-17 erg/s/cm²/Å)).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["IRHead", "HeadEnsemble", "build_head", "head_features", "BANDS", "SIGMA_FLOOR_MAG"]

#: WISE bands predicted, in output order.
BANDS = ("w1", "w2", "w3", "w4")
#: smallest σ the head can return, mag.
SIGMA_FLOOR_MAG = 1e-3


def head_features(latents: torch.Tensor, z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """float32 [N, S+2] from latents [N, S], z [N] and norm [N] (1e-17 erg/s/cm²/Å, > 0)."""
    return torch.cat([latents, z[:, None], torch.log10(norm)[:, None]], dim=1).to(torch.float32)


class IRHead(nn.Module):
    """MLP with ReLU giving (mean, σ) per band.

    Parameters
    ----------
    n_in : int
        Number of input features (latents + 2).
    n_hidden : tuple[int, ...]
        Hidden layer widths.
    n_bands : int
        Outputs per moment (4: W1..W4).

    Forward
    -------
    x : float32 [N, n_in]  (see :func:`head_features`)
    returns : (mean float32 [N, n_bands] Vega mag, sigma float32 [N, n_bands] mag)
    """

    def __init__(self, n_in: int = 8, n_hidden: tuple = (64, 64), n_bands: int = 4):
        super().__init__()
        self.n_in, self.n_hidden, self.n_bands = n_in, tuple(n_hidden), n_bands
        sizes = [n_in, *n_hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 2 * n_bands))
        self.net = nn.Sequential(*layers)
        self.register_buffer("x_mean", torch.zeros(n_in))
        self.register_buffer("x_std", torch.ones(n_in))
        self.register_buffer("y_mean", torch.zeros(n_bands))
        self.register_buffer("y_std", torch.ones(n_bands))

    def config(self) -> dict:
        return {"n_in": self.n_in, "n_hidden": list(self.n_hidden), "n_bands": self.n_bands}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net((x - self.x_mean) / self.x_std)
        mean = out[:, : self.n_bands] * self.y_std + self.y_mean
        sigma = F.softplus(out[:, self.n_bands:]) * self.y_std + SIGMA_FLOOR_MAG
        return mean, sigma


class HeadEnsemble(nn.Module):
    """A deep ensemble of :class:`IRHead` members, combined as a Gaussian mixture.

    mean = ⟨μ_i⟩, σ² = ⟨σ_i² + μ_i²⟩ − mean²: the spread of the members adds the
    epistemic part to each member's aleatoric σ.
    """

    def __init__(self, members: list[IRHead]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        #: per-band factor on σ fitted on the validation split (post-hoc calibration; 1 = none)
        self.register_buffer("sigma_scale", torch.ones(members[0].n_bands))

    def config(self) -> dict:
        return {**self.members[0].config(), "n_members": len(self.members)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        mu = torch.stack([o[0] for o in outs])
        sg = torch.stack([o[1] for o in outs])
        mean = mu.mean(0)
        var = (sg**2 + mu**2).mean(0) - mean**2
        return mean, torch.sqrt(var.clamp(min=SIGMA_FLOOR_MAG**2)) * self.sigma_scale


def build_head(config: dict) -> nn.Module:
    """An untrained head of a bundle's ``head_config`` (an :class:`IRHead` or a :class:`HeadEnsemble`)."""
    kw = dict(n_in=config["n_in"], n_hidden=tuple(config["n_hidden"]), n_bands=config["n_bands"])
    if "n_members" in config:
        return HeadEnsemble([IRHead(**kw) for _ in range(int(config["n_members"]))])
    return IRHead(**kw)
