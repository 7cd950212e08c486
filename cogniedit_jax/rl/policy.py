"""The sampling policy that a rollout and its loss share, and the trainable pytree they act through."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct

from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.sampling.edit_loop import Layout

MODES = ("dense", "standard")


@flax.struct.dataclass
class Trainable:
    """What GRPO changes: a `lora.Lora` and the token-focus params (either may be None). The reference
    policy is the same model with both None."""

    lora: Any = None
    focus: Any = None


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Everything that defines the stochastic policy pi(x_next | x): a rollout records it and the loss
    refuses to score a rollout made under a different one (its ratios would not start at 1).

    noise_level: the SDE's a (sigma_t = a sqrt(t / (1 - t))); 0.7 as in Flow-GRPO.
    k: SDE steps per window (the paper's k = 5). cfg_scale: true CFG (used when the condition has a
    negative prompt). reduce: log-density per latent, "mean" over elements (Flow-GRPO) or "sum".
    """

    model: MMDiTConfig
    layout: Layout
    num_steps: int = 10
    k: int = 5
    noise_level: float = 0.7
    cfg_scale: float = 4.0
    reduce: str = "mean"

    def __post_init__(self):
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"policy k={self.k}: need 1 <= k <= num_steps={self.num_steps}")
        if self.noise_level <= 0:
            raise ValueError(
                f"policy noise_level={self.noise_level}: must be > 0 (an ODE step has no density)"
            )
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"policy reduce={self.reduce!r}: expected 'mean' or 'sum'")

    def mismatch(self, other: "PolicyConfig") -> list[str]:
        """The fields on which two policies differ."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
