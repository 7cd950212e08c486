"""Qwen-Image-Edit's sigma schedule: diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` as the edit
pipeline drives it (sigmas = linspace(1, 1/N, N), mu from the target's token count), on the host in numpy
float32 with diffusers' operation order, so sigmas and timesteps match it bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

# The fields of diffusers' scheduler config that change nothing for flow-matching Euler sampling here.
_IGNORED = ("_class_name", "_diffusers_version", "stochastic_sampling")
_UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Defaults: Qwen-Image-Edit's `scheduler/scheduler_config.json`."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"scheduler time_shift_type={self.time_shift_type!r}: expected exponential or linear"
            )

    @classmethod
    def from_diffusers(cls, config: dict) -> "SchedulerConfig":
        on = [k for k in _UNSUPPORTED if config.get(k)]
        if on:
            raise ValueError(
                f"scheduler config fields {on} are unsupported (Qwen-Image-Edit uses none of them)"
            )
        if config.get("stochastic_sampling"):
            raise ValueError(
                "scheduler config field stochastic_sampling=True is unsupported: "
                "stochastic steps are chosen per step by the edit loop (sde.py)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known - set(_IGNORED) - set(_UNSUPPORTED))
        if unknown:
            raise ValueError(f"scheduler config has unknown fields {unknown}")
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def from_file(cls, path) -> "SchedulerConfig":
        return cls.from_diffusers(json.loads(Path(path).read_text()))


def calculate_shift(cfg: SchedulerConfig, image_seq_len: int) -> float:
    """mu, linear in the target image's token count (the pipeline's `calculate_shift`)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def make_schedule(cfg: SchedulerConfig, num_steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1] ending in 0, timesteps [N] = 1000 * sigmas[:-1]), float32.

    sigmas[0] is exactly 1: the first step starts from pure noise.
    """
    if num_steps < 1 or (num_steps == 1 and cfg.shift_terminal):
        # One step with shift_terminal: the stretch divides 0 by 0 (diffusers returns NaN sigmas).
        raise ValueError(f"num_steps={num_steps}: need at least {2 if cfg.shift_terminal else 1}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(cfg, image_seq_len)
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(cfg.num_train_timesteps)
    return np.append(sigmas, np.float32(0.0)), timesteps
