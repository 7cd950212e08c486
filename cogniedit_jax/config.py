"""Training configs: Python files whose `get_config(arg=None)` returns an `ml_collections.ConfigDict` (the
schema is documented in configs/tiny.py), command-line overrides `--config.a.b=value`, and validation that
names every bad field at once.

`load_config("configs/tiny.py:ARG", ["policy.k=3", ...])`: ARG (optional) is passed to get_config. An override
must name an existing field; its value is read as a Python literal when it parses as one (3, 1e-4, True,
None, (1, 2), "x") and as a plain string otherwise, then checked against the field's type by the ConfigDict.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import ml_collections

from cogniedit_jax.models.lora import LoraConfig
from cogniedit_jax.models.token_focus import FocusConfig
from cogniedit_jax.rl import advantages, policy as policy_lib
from cogniedit_jax.rl.dense_grpo import LossConfig
from cogniedit_jax.sidecar.parsing import REWARD_NORMALIZATIONS

# The built-in choices of each pluggable part; anything else must be "package.module:function".
MODEL_SOURCES = ("random", "converted")
DATA_SOURCES = ("random", "cache")
JUDGE_SOURCES = ("rule", "sidecar")


class ConfigError(ValueError):
    pass


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """`spec` = "path/to/config.py" or "path/to/config.py:ARG"; overrides: ["a.b=value", ...]."""
    path, _, arg = str(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_cogniedit_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {path}: defines no get_config()")
    config = module.get_config(arg or None)
    config.lock()  # no new fields: an override can only change what the file defines
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    name, eq, raw = override.partition("=")
    if not eq:
        raise ConfigError(f"--config.{override}: expected --config.FIELD=VALUE")
    *parents, leaf = name.split(".")
    node = config
    for i, part in enumerate(parents):
        where = ".".join(parents[: i + 1])
        if part not in node:
            raise ConfigError(
                f"--config.{name}: no such field {where} (fields here: {', '.join(sorted(node))})"
            )
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{name}: {where} is a single field, not a group of fields")
    if leaf not in node:
        raise ConfigError(f"--config.{name}: no such field (fields here: {', '.join(sorted(node))})")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(
            f"--config.{name}: is a group of fields; set one of {', '.join(sorted(node[leaf]))}"
        )
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    current = node[leaf]
    if isinstance(current, str) and not isinstance(value, str):
        value = raw  # a string field keeps what was typed ("1e-3" stays a string)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"--config.{name}={raw}: {type(current).__name__} expected, got {type(value).__name__} ({e})"
        ) from None


def is_plugin(source: str) -> bool:
    return ":" in source


def resolve_plugin(field: str, source: str):
    """ "package.module:function" -> the function; errors name the config field."""
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}={source!r}: cannot import {module_name} ({e})") from None
    if not callable(getattr(module, attr, None)):
        raise ConfigError(f"{field}={source!r}: {module_name} has no function {attr}")
    return getattr(module, attr)


def _check(errors: list, field: str, ok: bool, message: str) -> None:
    if not ok:
        errors.append(f"{field}: {message}")


def _source(errors, field, value, builtins):
    _check(
        errors,
        field,
        isinstance(value, str) and (value in builtins or is_plugin(value)),
        f"{value!r}: expected one of {builtins} or 'package.module:function'",
    )


def _dataclass(errors, field, cls, **kwargs):
    """Build `cls(**kwargs)`, turning its own validation error into one naming the config group."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        errors.append(f"{field}: {e}")
        return None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises one ConfigError listing every field that is wrong (field: value and what was expected)."""
    c, errors = config, []
    for name in ("total_steps", "updates_per_rollout", "max_bad_updates"):
        _check(
            errors, name, isinstance(c[name], int) and c[name] >= 1, f"{c[name]!r}: expected an integer >= 1"
        )
    _check(errors, "stop_after", c.stop_after >= 0, f"{c.stop_after}: expected >= 0 (0: run to total_steps)")
    _source(errors, "model.source", c.model.source, MODEL_SOURCES)
    if c.model.source == "converted":
        _check(
            errors, "model.path", bool(c.model.path), "model.source='converted' needs the converted folder"
        )
    _check(errors, "lora.rank", c.lora.rank >= 1, f"{c.lora.rank}: expected >= 1")
    _check(errors, "lora.alpha", c.lora.alpha > 0, f"{c.lora.alpha}: expected > 0")
    if c.focus.enabled:
        _dataclass(
            errors,
            "focus",
            FocusConfig,
            xi=c.focus.xi,
            predictor_dim=c.focus.predictor_dim,
            train_mode=c.focus.train_mode,
        )
    p = c.policy
    _check(errors, "policy.num_steps", p.num_steps >= 2, f"{p.num_steps}: expected >= 2")
    _check(
        errors, "policy.k", 1 <= p.k <= p.num_steps, f"{p.k}: need 1 <= k <= policy.num_steps={p.num_steps}"
    )
    _check(errors, "policy.noise_level", p.noise_level > 0, f"{p.noise_level}: expected > 0")
    _check(errors, "policy.reduce", p.reduce in ("mean", "sum"), f"{p.reduce!r}: expected 'mean' or 'sum'")
    _check(
        errors,
        "loss.mode",
        c.loss.mode in policy_lib.MODES,
        f"{c.loss.mode!r}: expected one of {policy_lib.MODES}",
    )
    _check(errors, "loss.clip_eps", 0 < c.loss.clip_eps < 1, f"{c.loss.clip_eps}: expected 0 < clip_eps < 1")
    _check(errors, "loss.beta", c.loss.beta >= 0, f"{c.loss.beta}: expected >= 0")
    _check(
        errors,
        "loss.advantage_mode",
        c.loss.advantage_mode in advantages.MODES,
        f"{c.loss.advantage_mode!r}: expected one of {advantages.MODES}",
    )
    _check(errors, "rollout.group_size", c.rollout.group_size >= 1, f"{c.rollout.group_size}: expected >= 1")
    _source(errors, "data.source", c.data.source, DATA_SOURCES)
    _check(errors, "data.batch_size", c.data.batch_size >= 1, f"{c.data.batch_size}: expected >= 1")
    if c.data.source == "cache":
        for name in ("manifest", "cache_dir"):
            _check(errors, f"data.{name}", bool(c.data[name]), "data.source='cache' needs it")
    _source(errors, "judge.source", c.judge.source, JUDGE_SOURCES)
    if c.judge.source == "rule":
        _check(errors, "judge.rule", bool(c.judge.rule), "judge.source='rule' needs a rule judge name")
    _check(
        errors,
        "judge.normalization",
        c.judge.normalization in REWARD_NORMALIZATIONS,
        f"{c.judge.normalization!r}: expected one of {REWARD_NORMALIZATIONS}",
    )
    o = c.optim
    _check(errors, "optim.lr", o.lr > 0, f"{o.lr}: expected > 0")
    _check(
        errors, "optim.warmup_frac", 0 <= o.warmup_frac < 1, f"{o.warmup_frac}: expected 0 <= warmup_frac < 1"
    )
    _check(errors, "optim.grad_clip", o.grad_clip > 0, f"{o.grad_clip}: expected > 0")
    _check(errors, "optim.weight_decay", o.weight_decay >= 0, f"{o.weight_decay}: expected >= 0")
    for name in ("data", "fsdp"):
        v = c.mesh[name]
        _check(
            errors, f"mesh.{name}", isinstance(v, int) and (v >= 1 or v == -1), f"{v!r}: expected >= 1 or -1"
        )
    _check(errors, "checkpoint.every", c.checkpoint.every >= 1, f"{c.checkpoint.every}: expected >= 1")
    _check(errors, "checkpoint.keep", c.checkpoint.keep >= 1, f"{c.checkpoint.keep}: expected >= 1")
    _check(errors, "log.grid_every", c.log.grid_every >= 0, f"{c.log.grid_every}: expected >= 0 (0: never)")
    if errors:
        raise ConfigError(f"{len(errors)} bad config field(s):\n  " + "\n  ".join(errors))


def loss_config(config, policy: policy_lib.PolicyConfig) -> LossConfig:
    return LossConfig(policy, clip_eps=config.loss.clip_eps, beta=config.loss.beta, mode=config.loss.mode)


def lora_config(config) -> LoraConfig:
    return LoraConfig(
        rank=config.lora.rank, alpha=float(config.lora.alpha), targets=tuple(config.lora.targets)
    )


def focus_config(config) -> FocusConfig | None:
    if not config.focus.enabled:
        return None
    return FocusConfig(
        xi=config.focus.xi, predictor_dim=config.focus.predictor_dim, train_mode=config.focus.train_mode
    )
