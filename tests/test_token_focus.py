"""Dynamic Token Focus Relocation: identity at init, windows vs padding, gradients vs finite differences."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.analysis import focus_map
from cogniedit_jax.models import MMDiTConfig, init_params, transformer_forward
from cogniedit_jax.models.lora import Lora, LoraConfig, init_lora
from cogniedit_jax.models.mmdit import transformer_forward_with_records
from cogniedit_jax.models.token_focus import (
    Focus,
    FocusConfig,
    init_focus,
    layout,
    load_focus,
    relocate,
    save_focus,
)

CFG = MMDiTConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                  in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
IMG_SHAPES = [[(1, 2, 3), (1, 2, 3)]] * 3
TXT_LEN = 9
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")  # random weights with the PRNG that compiles fastest


def prefix_mask(valid_lengths, length=TXT_LEN):
    return jnp.asarray([[1] * n + [0] * (length - n) for n in valid_lengths], jnp.int32)


def model_inputs(seed=0, valid_lengths=(9, 5, 2)):
    k = jax.random.split(jax.random.key(seed), 2)
    return {"hidden_states": jax.random.normal(k[0], (3, 12, CFG.in_channels)),
            "encoder_hidden_states": jax.random.normal(k[1], (3, TXT_LEN, CFG.joint_attention_dim)),
            "encoder_hidden_states_mask": prefix_mask(valid_lengths),
            "timestep": jnp.asarray([0.9, 0.5, 0.2])}


def with_params(focus: Focus, **changes) -> Focus:
    return focus.replace(params={**focus.params, **changes})


@jax.jit
def run(params, focus, lora, inputs):
    return transformer_forward(CFG, params, img_shapes=IMG_SHAPES, lora=lora, focus=focus, **inputs)


relocate_jit = jax.jit(relocate, static_argnums=3)
layout_jit = jax.jit(layout, static_argnums=(1, 2, 3))


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, FAST_KEY)


# --- identity at initialisation -----------------------------------------------------------------------


def test_fresh_focus_leaves_the_model_exactly_unchanged(params):
    """Max abs diff 0 in fp32, in every mode (xi 3 < L) and with xi 64 > L, also beside a (non-zero) LoRA;
    an open gate does change the output."""
    x = model_inputs()
    lora = init_lora(CFG, LoraConfig(rank=2), jax.random.key(1))
    lora = Lora(jax.tree.map(lambda a: a + 0.05, lora.params), lora.scale)
    focus = init_focus(CFG, FocusConfig(xi=3), jax.random.key(2))
    ref = np.asarray(run(params, None, None, x))
    for variant in (focus, focus.training(), focus.replace(train_mode="expected").training(),
                    init_focus(CFG, FocusConfig(xi=64), jax.random.key(3))):
        out = np.asarray(run(params, variant, None, x))
        assert np.abs(out - ref).max() == 0.0, variant.mode
    with_lora = np.asarray(run(params, focus.training(), lora, x))
    assert np.abs(with_lora - np.asarray(run(params, None, lora, x))).max() == 0.0
    opened = with_params(focus, gate=jnp.full((2,), 0.5))
    assert np.abs(np.asarray(run(params, opened, None, x)) - ref).max() > 1e-3


# --- windows and padding --------------------------------------------------------------------------------


def random_layer(key, xi, d=32, r=8, gate=1.0):
    k = jax.random.split(key, 4)
    return {"predictor": {"w1": jax.random.normal(k[0], (d, r)), "b1": 0.1 * jax.random.normal(k[1], (r,)),
                          "w2": jax.random.normal(k[2], (r,))},
            "soft_tokens": jax.random.normal(k[3], (xi, d)), "gate": jnp.asarray(gate)}


MASKS = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1],   # no padding
                  [1, 1, 1, 1, 1, 0, 0, 0, 0],   # right padding
                  [1, 0, 1, 1, 0, 1, 1, 1, 0],   # holes: windows run over valid tokens only
                  [1, 1, 0, 0, 0, 0, 0, 0, 0],   # L_valid = 2 < xi
                  [0, 0, 0, 0, 0, 0, 0, 0, 0]])  # nothing valid


@pytest.mark.parametrize("mode", ["hard", "straight_through", "expected"])
def test_windows_never_cover_padding(mode):
    xi = 3
    for seed in range(4):
        k_layer, k_txt = jax.random.split(jax.random.key(seed))
        layer = random_layer(k_layer, xi)
        txt = jax.random.normal(k_txt, (len(MASKS), TXT_LEN, 32))
        out, rec = relocate_jit(layer, txt, layout_jit(jnp.asarray(MASKS), *MASKS.shape, xi), mode)
        out, txt, soft = np.asarray(out), np.asarray(txt), np.asarray(layer["soft_tokens"])
        np.testing.assert_array_equal(out[MASKS == 0], txt[MASKS == 0])  # padding untouched, bit for bit
        for b, mask in enumerate(MASKS):
            valid = np.flatnonzero(mask)
            start, width = int(rec["start"][b]), int(rec["width"][b])
            assert width == min(xi, len(valid)) and start + width <= max(len(valid), 1)
            probs = np.asarray(rec["probs"][b])
            assert probs[len(valid) - width + 1:].max(initial=0) == 0.0  # no mass on impossible starts
            if mode == "expected":
                continue
            window = valid[start:start + width]  # the hard window: soft tokens replace it (gate 1)
            np.testing.assert_allclose(out[b, window], soft[:width], atol=1e-5)
            rest = np.setdiff1d(np.arange(TXT_LEN), window)
            np.testing.assert_array_equal(out[b, rest], txt[b, rest])


def test_xi_beyond_valid_length_clips_the_window():
    """xi = 64 > L_valid: one window over all valid tokens, filled with the first L_valid soft tokens."""
    layer = random_layer(jax.random.key(0), 64)
    txt = jax.random.normal(jax.random.key(1), (2, TXT_LEN, 32))
    out, rec = relocate_jit(layer, txt, layout_jit(prefix_mask([9, 4]), 2, TXT_LEN, 64), "hard")
    np.testing.assert_array_equal(rec["start"], [0, 0])
    np.testing.assert_array_equal(rec["width"], [9, 4])
    np.testing.assert_allclose(out[0], layer["soft_tokens"][:9], atol=1e-5)
    np.testing.assert_allclose(out[1, :4], layer["soft_tokens"][:4], atol=1e-5)
    np.testing.assert_array_equal(out[1, 4:], txt[1, 4:])


def test_model_ignores_padding_with_an_open_focus(params):
    """End to end: padded text states cannot steer the window (expected mode: every start's probability
    counts)."""
    focus = with_params(init_focus(CFG, FocusConfig(xi=3), jax.random.key(3)), gate=jnp.ones(2)).training()
    focus = focus.replace(train_mode="expected")
    x = model_inputs()
    noisy = x["encoder_hidden_states"] + 100.0 * (1 - x["encoder_hidden_states_mask"])[..., None]
    np.testing.assert_allclose(run(params, focus, None, {**x, "encoder_hidden_states": noisy}),
                               run(params, focus, None, x), rtol=0, atol=1e-6)


def test_hard_mode_picks_the_argmax():
    """xi = 1 and a predictor that scores tokens by feature 0: the spiked token is the window."""
    d, xi = 32, 1
    layer = random_layer(jax.random.key(0), xi, d=d)
    layer["predictor"] = {"w1": jnp.zeros((d, 8)).at[0, 0].set(1.0), "b1": jnp.zeros(8),
                          "w2": jnp.zeros(8).at[0].set(1.0)}
    txt = 0.1 * jax.random.normal(jax.random.key(1), (2, TXT_LEN, d))
    txt = txt.at[0, 6, 0].set(5.0).at[1, 2, 0].set(5.0)
    out, rec = relocate_jit(layer, txt, layout_jit(prefix_mask([9, 5]), 2, TXT_LEN, xi), "hard")
    np.testing.assert_array_equal(rec["start"], [6, 2])
    np.testing.assert_array_equal(rec["start"], np.argmax(rec["probs"], -1))
    np.testing.assert_allclose(out[0, 6], layer["soft_tokens"][0], atol=1e-6)
    np.testing.assert_allclose(out[1, 2], layer["soft_tokens"][0], atol=1e-6)


def test_straight_through_forward_is_the_hard_forward(params):
    """Bit for bit: Dense GRPO's ratio is exactly 1 at theta = theta_old when rollouts run the hard focus."""
    focus = with_params(init_focus(CFG, FocusConfig(xi=3), jax.random.key(4)), gate=jnp.full((2,), 0.7))
    x = model_inputs()
    hard = np.asarray(run(params, focus, None, x))
    np.testing.assert_array_equal(run(params, focus.training(), None, x), hard)
    expected = np.asarray(run(params, focus.replace(train_mode="expected").training(), None, x))
    assert np.abs(expected - hard).max() > 1e-4


# --- gradients ----------------------------------------------------------------------------------------------


def direction(tree, key, part):
    """A random direction on the leaves whose path (`tree_util.keystr`) contains `part`, zero elsewhere."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(k, a.shape, a.dtype) if part in jax.tree_util.keystr(path) else jnp.zeros_like(a)
        for k, (path, a) in zip(jax.random.split(key, len(flat)), flat)])


def directional_check(loss, grad, tree, v, eps):
    """(autodiff <grad, v>, central difference of loss along v)."""
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
    shifted = [loss(jax.tree.map(lambda p, d, s=s: p + s * eps * d, tree, v)) for s in (1, -1)]
    return float(analytic), float((shifted[0] - shifted[1]) / (2 * eps))


def test_model_gradients_match_finite_differences_in_float64():
    """Through the tiny model in float64, focus and LoRA differentiated together: every focus leaf gets a
    non-zero gradient in both training modes; in expected mode, directional derivatives along eta, the soft
    tokens, the gate and the LoRA match central differences to 1e-6 relative."""
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64")
        f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        params = jax.jit(init_params, static_argnums=(0, 2))(cfg, FAST_KEY, jnp.float64)
        x = f64(model_inputs())
        weights = jax.random.normal(jax.random.key(5), (3, 12, cfg.out_features), jnp.float64)
        focus = with_params(init_focus(cfg, FocusConfig(xi=3), jax.random.key(6)), gate=jnp.full((2,), 0.5))
        focus = focus.replace(params=f64(focus.params))
        lora = init_lora(cfg, LoraConfig(rank=2), jax.random.key(7))
        lora = Lora(f64(jax.tree.map(lambda a: a + 0.05, lora.params)), lora.scale)
        for mode in ("expected", "straight_through"):
            @jax.jit
            def loss(trainable, mode=mode):
                lora, focus = trainable
                out = transformer_forward(cfg, params, img_shapes=IMG_SHAPES, lora=lora,
                                          focus=focus.replace(train_mode=mode).training(), **x)
                return jnp.sum(out * weights)

            grad_fn = jax.jit(jax.grad(loss))
            g_lora, g_focus = grad_fn((lora, focus))
            for path, g in jax.tree_util.tree_flatten_with_path(g_focus.params)[0]:
                assert float(jnp.abs(g).max()) > 0, (mode, jax.tree_util.keystr(path))
            assert float(jnp.abs(g_lora.params["blocks"]["attn"]["to_q"]["b"]).max()) > 0
            if mode == "straight_through":  # its hard forward is piecewise constant in eta: nothing to
                # difference there, but eta's surrogate gradient is non-zero (above); at init (gate 0) only
                # the gate moves the loss, and its gradient is non-zero: training can open it.
                closed = grad_fn((lora, with_params(focus, gate=jnp.zeros(2, jnp.float64))))[1]
                assert float(jnp.abs(closed.params["gate"]).min()) > 0
                continue
            for i, name in enumerate(("predictor", "soft_tokens", "gate", "[0].params")):  # [0]: the LoRA
                v = direction((lora, focus), jax.random.key(20 + i), name)
                analytic, numeric = directional_check(loss, (g_lora, g_focus), (lora, focus), v, 1e-6)
                assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (name, analytic, numeric)


# --- records, config, files ---------------------------------------------------------------------------


def test_records_stack_per_layer(params):
    focus = init_focus(CFG, FocusConfig(xi=3), jax.random.key(8))
    x = model_inputs()
    out, rec = jax.jit(lambda p, f, x: transformer_forward_with_records(
        CFG, p, img_shapes=IMG_SHAPES, focus=f, probe=lambda q, k, v, m: jnp.sum(q, axis=(1, 2, 3)), **x))(
            params, focus, x)
    assert rec["focus"]["start"].shape == (2, 3) and rec["focus"]["probs"].shape == (2, 3, TXT_LEN)
    assert rec["probe"].shape == (2, 3)
    np.testing.assert_allclose(out, run(params, focus, None, x), rtol=0, atol=1e-5)


def test_bad_config_and_mismatched_focus_are_refused(params):
    with pytest.raises(ValueError, match="train_mode='sample'"):
        FocusConfig(train_mode="sample")
    with pytest.raises(ValueError, match="xi=0"):
        FocusConfig(xi=0)
    wrong = init_focus(CFG.replace(num_layers=3), FocusConfig(xi=3), jax.random.key(0))
    with pytest.raises(ValueError, match=r"soft_tokens expected \(2, 3, 32\), found \(3, 3, 32\)"):
        run(params, wrong, None, model_inputs())
    with pytest.raises(ValueError, match="focus mode 'soft'"):
        relocate(random_layer(jax.random.key(0), 3), jnp.zeros((1, 4, 32)), layout(None, 1, 4, 3), "soft")


def test_save_and_load_round_trip(tmp_path):
    focus = init_focus(CFG, FocusConfig(xi=3, train_mode="expected"), jax.random.key(9))
    file = save_focus(focus, tmp_path)
    back = load_focus(tmp_path, CFG)
    assert back.train_mode == "expected" and not back.train
    jax.tree.map(np.testing.assert_array_equal, back.params, focus.params)
    with pytest.raises(ValueError, match=str(file)):
        load_focus(file, CFG.replace(num_attention_heads=3))


# --- the analysis command -----------------------------------------------------------------------------


def check_map(out_dir, tokens, layers):
    result = json.loads((out_dir / focus_map.JSON_NAME).read_text())
    mass = np.asarray(result["attention_mass"])
    assert result["tokens"] == tokens and mass.shape == (layers, len(tokens))
    assert (mass > 0).all() and (mass.sum(1) <= 1 + 1e-6).all()
    with Image.open(out_dir / focus_map.PNG_NAME) as img:
        assert img.width > len(tokens) * 10 and img.height > layers * 10
    return result


def test_focus_map_on_a_random_tiny_model(tmp_path):
    words = "Change the color of the purple eyes to red"
    result = focus_map.main(["--random-tiny", "--xi", "3", "--instruction", words, "--out", str(tmp_path)])
    check_map(tmp_path, words.split(), focus_map.TINY.num_layers)
    for w in result["windows"]:
        assert w["width"] == 3 and 0 <= w["start"] <= 6
        assert w["tokens"] == words.split()[w["start"]:w["start"] + 3]
        assert w["probability"] == pytest.approx(max(w["start_probs"]), abs=1e-6)


def test_focus_map_on_a_converted_checkpoint(tmp_path):
    """The user's path: diffusers model -> converter -> focus_map with a cached condition and a focus file."""
    from tests.reference import convert_and_load, tiny_transformer

    cfg, _ = convert_and_load(tiny_transformer(seed=1), tmp_path)
    tokens = ["Add", "five", "birds", "<pad>", "<pad>"]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cond.npz", prompt_embeds=rng.normal(size=(1, 5, cfg.joint_attention_dim)),
             mask=np.array([1, 1, 1, 0, 0]), tokens=np.array(tokens),
             source_latents=rng.normal(size=(6, cfg.in_channels)), source_grid=np.array([2, 3]))
    save_focus(init_focus(cfg, FocusConfig(xi=2), jax.random.key(0)), tmp_path / "focus")
    result = focus_map.main(["--checkpoint", str(tmp_path / "converted"), "--condition",
                             str(tmp_path / "cond.npz"), "--focus", str(tmp_path / "focus"),
                             "--out", str(tmp_path / "map")])
    check_map(tmp_path / "map", tokens[:3], cfg.num_layers)
    assert all(w["start"] + w["width"] <= 3 for w in result["windows"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_embeds=np.zeros((5, cfg.joint_attention_dim + 1)), tokens=np.array(tokens))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        focus_map.main(["--checkpoint", str(tmp_path / "converted"), "--condition", str(bad),
                        "--out", str(tmp_path / "map2")])
