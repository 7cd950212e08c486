"""Will a training config fit? Compile its rollout and update steps from abstract shapes and print the
per-device memory XLA reports, before renting any GPU.

    python -m cogniedit_jax.plan --config configs/base.py --devices 8 [--device-memory-gb 80] [--layers N]
        [--config.FIELD=VALUE ...]

No weights are read: the frozen MMDiT is the converted model's `config.json` when `model.path` has one,
else `model.arch` over the real Qwen-Image defaults (`MMDiTConfig`: 60 layers, 20.4 B params), built with
`jax.eval_shape` and carrying `parallel.frozen_shardings`; LoRA, focus and the optimizer state come from
`train.init_state`'s shapes. The rollout batch has the config's sizes: `data.batch_size` x
`rollout.group_size` rows; the latent is `data.latent_hw`, or the square of area `data.target_area` (a
1024x1024 edit: 4096 target + 4096 source tokens); text `data.text_len` or `data.max_text_len` tokens, the
negative prompt (true CFG) as long. Then `train.rollout_step` and `train.update_step` are lowered and
compiled with the trainer's shardings. `--devices N` simulates N CPU devices; without it the present
devices are used (on a GPU host: the GPU compiler's figures, with cuDNN attention). CPU figures include
XLA's materialised attention scores (the `scores` column: one such buffer), which cuDNN never holds.
`--layers N` compiles an N-layer model instead (a what-if; its figures are for N layers). Compile time
does not grow with depth (the block scan), and the peak is not linear in depth at small depths (XLA's buffer
reuse), so the full depth is what to compile.

Exit code 0 if the larger step fits `--device-memory-gb`, 1 if not, 2 on a bad argument or config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from cogniedit_jax import config as config_lib
from cogniedit_jax import parallel, train
from cogniedit_jax.checkpoint import abstract_like
from cogniedit_jax.models import MMDiTConfig, init_params
from cogniedit_jax.models.loading import CONFIG_NAME
from cogniedit_jax.rl.policy import PolicyConfig
from cogniedit_jax.sampling.edit_loop import EditCondition, edit_layout

MB, GB = 1024**2, 1024**3
_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
USAGE = (
    "usage: python -m cogniedit_jax.plan --config CONFIG.py [--devices N] [--device-memory-gb GB] "
    "[--layers N] [--config.FIELD=VALUE ...]"
)


@dataclasses.dataclass
class Args:
    config: str
    devices: int | None = None
    device_memory_gb: float = 80.0
    layers: int | None = None
    overrides: tuple[str, ...] = ()


def parse_args(argv: list[str]) -> Args:
    values, overrides, i = {}, [], 0
    names = {"--config": str, "--devices": int, "--device-memory-gb": float, "--layers": int}
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in names:
            if not eq:
                i += 1
                if i == len(argv):
                    raise config_lib.ConfigError(f"{name} needs a value; {USAGE}")
                value = argv[i]
            try:
                values[name[2:].replace("-", "_")] = names[name](value)
            except ValueError:
                raise config_lib.ConfigError(f"{name}={value!r}: expected {names[name].__name__}") from None
        elif argv[i].startswith("--config."):
            overrides.append(argv[i].removeprefix("--config."))
        else:
            raise config_lib.ConfigError(f"unknown argument {argv[i]!r}; {USAGE}")
        i += 1
    if "config" not in values:
        raise config_lib.ConfigError(f"--config is required; {USAGE}")
    for name in ("devices", "layers", "device_memory_gb"):
        if name in values and values[name] <= 0:
            raise config_lib.ConfigError(f"--{name.replace('_', '-')}={values[name]}: expected > 0")
    return Args(**values, overrides=tuple(overrides))


def simulate_devices(n: int) -> bool:
    """Ask XLA for n host (CPU) devices; True if this process has them. XLA reads the flag when the backend
    starts, so it works in any process that has not used jax yet (importing it is fine)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICES_FLAG}={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    try:
        return jax.device_count() == n and jax.default_backend() == "cpu"
    except RuntimeError:  # a backend already started without cpu
        return False


# --- abstract inputs ---------------------------------------------------------------------------------


def model_config(config, layers: int | None) -> MMDiTConfig:
    """The converted model's `config.json` where `model.path` has one (only that file is read), else
    `model.arch` over MMDiTConfig's defaults (the real model); run as the config says, with XLA attention
    off GPU (cuDNN's fused kernel exists only there)."""
    impl = config.model.attention_impl if jax.default_backend() == "gpu" else "xla"
    runtime = {"dtype": config.model.dtype, "remat_policy": config.model.remat_policy, "attention_impl": impl}
    path = Path(config.model.path or ".")
    found = [f for f in (path / "transformer" / CONFIG_NAME, path / CONFIG_NAME) if f.is_file()]
    if config.model.source == "converted" and found:
        cfg = MMDiTConfig.from_json(found[0], **runtime)
    else:
        arch = dict(config.model.arch)
        if "axes_dims_rope" in arch:
            arch["axes_dims_rope"] = tuple(arch["axes_dims_rope"])
        cfg = MMDiTConfig(**arch, **runtime)
    return cfg if layers is None else cfg.replace(num_layers=layers)


def latent_hw(config) -> tuple[int, int]:
    d = config.data
    if tuple(d.latent_hw) != (0, 0):
        return tuple(d.latent_hw)
    side = 2 * round(math.sqrt(d.target_area) / d.vae_scale / 2)  # even: 2x2 patches
    return side, side


def text_len(config) -> int:
    return config.data.text_len or config.data.max_text_len


def abstract_condition(config, cfg: MMDiTConfig, mesh) -> EditCondition:
    """The global batch's condition as the trainer feeds it: replicated, fp32 states, int32 masks."""
    b, length, (h, w) = config.data.batch_size, text_len(config), latent_hw(config)
    repl = parallel.replicated(mesh)
    embeds = jax.ShapeDtypeStruct((b, length, cfg.joint_attention_dim), jnp.float32, sharding=repl)
    mask = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=repl)
    source = jax.ShapeDtypeStruct((b, (h // 2) * (w // 2), cfg.in_channels), jnp.float32, sharding=repl)
    negative = (embeds, mask) if config.data.negative_prompt else (None, None)
    return EditCondition(embeds, mask, source, *negative)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings); the largest shard counts."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# --- the plan ----------------------------------------------------------------------------------------


def attention_scores_bytes(hlo: str, seq: int) -> int:
    """The largest buffer of shape [..., seq, seq] in a compiled program's text: one attention score tensor
    (per device). XLA's attention materialises these; cuDNN's fused attention on GPU never does."""
    sizes = [
        math.prod(int(d) for d in dims.split(",")) * jnp.dtype(_HLO_DTYPES[t]).itemsize
        for t, dims in re.findall(r"\b(f32|bf16|f16|f64)\[([\d,]+)\]", hlo)
        if dims.endswith(f",{seq},{seq}")
    ]
    return max(sizes, default=0)


def memory_row(compiled, seq: int) -> dict:
    """Per-device bytes of a compiled SPMD program: donated arguments are reused for outputs (alias)."""
    m = compiled.memory_analysis()
    row = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temps": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
    }
    row["total"] = row["arguments"] + row["outputs"] + row["temps"] - row["aliased"]
    row["scores"] = attention_scores_bytes(compiled.as_text(), seq)
    return row


def plan(config, layers: int | None = None) -> dict:
    """Compile the trainer's two jitted steps for `config` on the present devices -> figures (bytes)."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    cfg = model_config(config, layers)
    key = jax.eval_shape(jax.random.key, 0)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), key)
    frozen = abstract_like(shapes, parallel.frozen_shardings(shapes, mesh))
    optim = train.OptimSpec.from_config(config)
    init = functools.partial(
        train.init_state, cfg, config_lib.lora_config(config), config_lib.focus_config(config), optim, mesh
    )
    state = jax.eval_shape(init, key)
    trainable, opt_state = abstract_like(state, jax.tree.map(lambda _: parallel.replicated(mesh), state))

    (h, w), group = latent_hw(config), config.rollout.group_size
    p = config.policy
    policy = PolicyConfig(
        cfg, edit_layout((h, w), [(h, w)]), p.num_steps, p.k, p.noise_level, p.cfg_scale, p.reduce
    )
    cond = abstract_condition(config, cfg, mesh)
    sigmas = jax.ShapeDtypeStruct((p.num_steps + 1,), jnp.float32, sharding=parallel.replicated(mesh))
    out = {"mesh": dict(mesh.shape), "model": cfg, "policy": policy, "text_len": text_len(config)}
    seq = text_len(config) + sum(math.prod(shape) for shape in policy.layout)

    t0 = time.perf_counter()
    shared = config.rollout.shared_noise
    compiled = train.rollout_step.lower(mesh, policy, frozen, trainable, cond, sigmas, key, group, shared).compile()
    out["rollout"], out["rollout_seconds"] = memory_row(compiled, seq), time.perf_counter() - t0

    rollout = jax.eval_shape(
        lambda *a: train.rollout_step(mesh, policy, *a, group, shared), frozen, trainable, cond, sigmas, key
    )
    rollout = abstract_like(rollout, train.rollout_shardings(mesh, rollout))
    loss_cfg = config_lib.loss_config(config, policy)
    t0 = time.perf_counter()
    compiled = train.update_step.lower(optim, loss_cfg, trainable, opt_state, frozen, rollout).compile()
    out["update"], out["update_seconds"] = memory_row(compiled, seq), time.perf_counter() - t0

    out |= {
        "params": count(frozen),
        "trainable_params": count(trainable),
        "frozen_per_device": per_device_bytes(frozen),
        "opt_state_per_device": per_device_bytes(opt_state),
    }
    return out


def report(result: dict, device_memory_gb: float) -> tuple[str, bool]:
    """(the table, fits): the rollout's peak adds the optimizer state (resident, though not its argument)."""
    cfg, mesh, policy = result["model"], result["mesh"], result["policy"]
    # GiB for real models, MiB for the tiny test ones.
    unit, scale = ("GiB", GB) if max(result[n]["total"] for n in ("rollout", "update")) >= GB else ("MiB", MB)
    gb = lambda n: f"{n / scale:.3f}"
    lines = [
        (
            f"mesh {mesh} on {jax.device_count()} {jax.default_backend()} devices; model {cfg.num_layers} layers, "
            f"inner {cfg.inner_dim}, {cfg.dtype}, remat {cfg.remat_policy}, attention {cfg.attention_impl}"
        ),
        (
            f"rollout: layout {policy.layout} (target, source), text {result['text_len']} tokens, "
            f"T={policy.num_steps}, k={policy.k}, cfg_scale={policy.cfg_scale}"
        ),
        (
            f"params: {result['params']:,} frozen ({gb(result['frozen_per_device'])} {unit} per device), "
            f"{result['trainable_params']:,} trainable ({gb(result['opt_state_per_device'])} {unit} "
            "optimizer state per device)"
        ),
        f"{f'per device ({unit})':<18}"
        + "".join(
            f"{k:>11}" for k in ("arguments", "outputs", "temps", "aliased", "total", "scores", "compile s")
        ),
    ]
    peaks = {}
    for name, resident in (("rollout", result["opt_state_per_device"]), ("update", 0)):
        row = result[name]
        lines.append(
            f"{name + ' step':<18}"
            + "".join(
                f"{gb(row[k]):>11}" for k in ("arguments", "outputs", "temps", "aliased", "total", "scores")
            )
            + f"{result[name + '_seconds']:11.1f}"
        )
        peaks[name] = row["total"] + resident  # the optimizer state stays on the device during the rollout
    peak = max(peaks.values())
    fits = peak <= device_memory_gb * GB
    if cfg.attention_impl == "xla" and result["update"]["scores"]:
        lines.append(
            "note: XLA attention materialises score tensors (`scores`: the largest one; temps hold "
            "several); cuDNN's fused attention on GPU holds none, so a GPU peak is lower"
        )
    lines.append(
        f"peak per device {peak / scale:.2f} {unit} vs {device_memory_gb:g} GiB: {'fits' if fits else 'does not fit'}"
    )
    return "\n".join(lines), fits


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        config = config_lib.load_config(args.config, args.overrides)
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.devices is not None and not simulate_devices(args.devices):
        # This process already started jax's backend: run the plan in a fresh one.
        return subprocess.run([sys.executable, "-m", "cogniedit_jax.plan", *argv], check=False).returncode
    try:
        result = plan(config, args.layers)
    except ValueError as e:  # a mesh that does not match the devices, a bad architecture
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, fits = report(result, args.device_memory_gb)
    print(table)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
