"""Advantages from rewards [B, G] (B edit instances x G samples each), with invalid rewards left out.

modes
- "batch": the paper's batch-level normalisation (section 3.1): (R - mean) / std over all valid B*G rewards,
  population std. One advantage per sample.
- "group": standard GRPO (eq. 1): the same, with mean and std per instance (row).
- "group_centered": R minus its instance's mean, over the std of those differences across the batch (Dr.
  GRPO's point): a group whose rewards differ by judge noise keeps small advantages instead of having them
  blown up to +-1 by its own tiny std, and instance difficulty still cancels out.
- "paper_mean": the paper's formula read literally, A^b = (1/G) sum_i (R_bi - mean) / std: one value per
  instance, broadcast over its G samples. (Its mean over i makes every sample of an instance share one
  advantage; we offer it to reproduce the text, "batch" is the default.)

Degenerate statistics give zeros, never NaN or huge values: a set whose std is (numerically) zero carries
no preference. Invalid rewards (the judge failed: `valid` False, or a non-finite reward) get advantage 0
and are left out of every mean and std.
"""

from __future__ import annotations

import jax.numpy as jnp

MODES = ("batch", "group", "group_centered", "paper_mean")
# Below this std (reward units: the judge's scores sum to 3..15) rewards count as constant.
_MIN_STD = 1e-6


def _normalise(rewards, valid, axis):
    n = valid.sum(axis, keepdims=True)
    safe_n = jnp.maximum(n, 1)
    r = jnp.where(valid, rewards, 0.0)
    mean = r.sum(axis, keepdims=True) / safe_n
    var = jnp.where(valid, (r - mean) ** 2, 0.0).sum(axis, keepdims=True) / safe_n
    std = jnp.sqrt(var)
    ok = valid & (std > _MIN_STD)
    return jnp.where(ok, (r - mean) / jnp.where(ok, std, 1.0), 0.0)


def compute_advantages(rewards, mode: str = "batch", valid=None):
    """rewards [B, G] -> advantages [B, G] (float32). `valid` [B, G] bool: False where the reward is missing.
    Pure; works under jit and on numpy input."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards of shape {rewards.shape}: expected [B, G]")
    valid = jnp.isfinite(rewards) & (True if valid is None else jnp.asarray(valid, bool))
    if mode == "batch":
        return _normalise(rewards, valid, axis=None)
    if mode == "group":
        return _normalise(rewards, valid, axis=1)
    if mode == "group_centered":
        n = jnp.maximum(valid.sum(1, keepdims=True), 1)
        centered = rewards - jnp.where(valid, rewards, 0.0).sum(1, keepdims=True) / n
        return _normalise(centered, valid, axis=None)
    if mode == "paper_mean":
        per_sample = _normalise(rewards, valid, axis=None)
        n = jnp.maximum(valid.sum(1, keepdims=True), 1)
        return jnp.where(valid, per_sample.sum(1, keepdims=True) / n, 0.0)
    raise ValueError(f"advantage mode {mode!r}: expected one of {MODES}")
