"""Training configs: the paper's settings in configs/base.py, overrides with clear errors, validation naming
every bad field, the lr schedule, and the FSDP sharding rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cogniedit_jax import parallel
from cogniedit_jax.config import ConfigError, apply_override, load_config, validate
from cogniedit_jax.train import OptimSpec, parse_args


def test_base_has_the_papers_settings():
    c = load_config("configs/base.py")
    validate(c)
    assert (c.lora.rank, c.optim.lr, c.data.batch_size, c.total_steps) == (4, 1e-5, 4, 500)
    assert (c.optim.warmup_frac, c.optim.grad_clip, c.policy.k, c.focus.xi) == (0.1, 1.0, 5, 64)
    assert c.loss.mode == "dense" and c.loss.advantage_mode == "batch" and c.model.source == "converted"
    assert parallel.mesh_shape(c.mesh.data, c.mesh.fsdp, 8) == (1, 8)


def test_overrides_are_typed_and_refused_by_name():
    c = load_config(
        "configs/tiny.py",
        [
            "policy.k=3",
            "optim.lr=1",
            "lora.targets=['attn.to_q']",
            "log.progress=True",
            "model.path=1e-3",
            "data.latent_hw=(4, 6)",
        ],
    )
    assert c.policy.k == 3 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.lora.targets == ("attn.to_q",) and c.log.progress is True
    assert c.model.path == "1e-3" and c.data.latent_hw == (4, 6)
    cases = {
        "lora.rnk=3": r"--config.lora.rnk: no such field \(fields here: alpha, rank, targets\)",
        "lora.rank=abc": r"--config.lora.rank=abc: int expected, got str",
        "lora=3": r"--config.lora: is a group of fields; set one of alpha, rank, targets",
        "nope.x=1": r"--config.nope.x: no such field nope",
        "seed.x=1": r"--config.seed.x: seed is a single field",
        "policy.k": r"expected --config.FIELD=VALUE",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            apply_override(load_config("configs/tiny.py"), override)
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/missing.py")


def test_validation_lists_every_bad_field():
    c = load_config(
        "configs/tiny.py",
        [
            "policy.k=9",
            "loss.mode=ppo",
            "optim.lr=0",
            "mesh.fsdp=0",
            "model.source=nomodule",
            "judge.normalization=max",
            "focus.xi=0",
        ],
    )
    with pytest.raises(ConfigError) as err:
        validate(c)
    text = str(err.value)
    assert text.startswith("7 bad config field(s)")
    for field in (
        "policy.k: 9: need 1 <= k <= policy.num_steps=4",
        "loss.mode: 'ppo'",
        "optim.lr: 0.0",
        "mesh.fsdp: 0",
        "model.source: 'nomodule'",
        "judge.normalization: 'max'",
        "focus: FocusConfig: xi=0",
    ):
        assert field in text, (field, text)


def test_command_line_arguments():
    assert parse_args(["--config", "c.py:arg", "--workdir=w", "--config.a.b=1"]) == (
        "c.py:arg",
        "w",
        ["a.b=1"],
    )
    for argv, message in (
        (["--config", "c.py"], "both --config and --workdir"),
        (["--cfg=x"], "unknown argument"),
        (["--workdir"], "--workdir needs a value"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args(argv)


def test_lr_schedule_warms_up_then_decays_to_zero():
    spec = OptimSpec.from_config(load_config("configs/base.py"))
    assert (spec.warmup_steps, spec.total_updates) == (50, 500)
    opt = spec.build()
    params = {"w": jnp.ones(3)}
    update = jax.jit(lambda state: opt.update({"w": jnp.ones(3)}, state, params)[1])
    state, lrs = opt.init(params), []
    for _ in range(500):
        state = update(state)
        lrs.append(float(state[1].hyperparams["learning_rate"]))  # the lr the update just used
    np.testing.assert_allclose([lrs[i] for i in (0, 25, 50, 275, 499)], [0, 5e-6, 1e-5, 5e-6, 0], atol=1e-9)
    assert np.argmax(lrs) == 50


def test_fsdp_shards_the_largest_divisible_axis_but_never_the_layer_axis():
    assert parallel.fsdp_spec("blocks/attn/to_q/kernel", (60, 3072, 3072), 8) == P(None, None, "fsdp")
    assert parallel.fsdp_spec("blocks/img_mod/kernel", (60, 3072, 18432), 8) == P(None, None, "fsdp")
    assert parallel.fsdp_spec("blocks/norm/scale", (64, 3), 8) == P()  # only the layer axis divides
    assert parallel.fsdp_spec("txt_in/kernel", (3584, 3072), 8) == P("fsdp", None)
    assert parallel.fsdp_spec("txt_in/bias", (3072,), 1) == P()
    assert parallel.fsdp_spec("proj_out/bias", (12,), 8) == P()
    with pytest.raises(ValueError, match="at most one may be -1"):
        parallel.mesh_shape(-1, -1, 8)
    with pytest.raises(ValueError, match="2 x mesh.fsdp=2 = 4, but there are 8 devices"):
        parallel.mesh_shape(2, 2, 8)
    assert parallel.mesh_shape(2, -1, 8) == (2, 4)


def test_cli_refuses_a_bad_override_with_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cogniedit_jax.train", "--config", "configs/tiny.py",
                           "--workdir", str(tmp_path), "--config.lora.rnk=3", "--config.policy.k=99"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2
    assert "error: --config.lora.rnk: no such field (fields here: alpha, rank, targets)" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was started
