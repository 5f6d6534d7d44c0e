"""The model: a spender-compatible spectrum encoder and an IR head (torch lives only here).

- :mod:`.encoder`: :class:`SpectrumEncoder`, the spender 0.3 architecture with the same
  parameter names, so published checkpoints load with ``load_state_dict``.
- :mod:`.head`: :class:`IRHead`, a heteroscedastic MLP giving mean and σ of W1–W4 (Vega mag).
- :mod:`.bundle`: a self-describing model directory (weights, grid, card) and per-process loading.
- :mod:`.train`: fitting the head with the Gaussian NLL.
"""
