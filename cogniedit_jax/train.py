"""The trainer: dense GRPO + token focus on a frozen, sharded MMDiT (the paper's Algorithm 1).

    python -m cogniedit_jax.train --config configs/tiny.py --workdir /tmp/tiny [--config.total_steps=20 ...]

Re-running the same command on the same workdir resumes from its last checkpoint. Per step: a global batch of
conditions -> a rollout of G samples each under theta_old (jitted, rows over the whole mesh) -> decode and
judge on the host (a failed judge call marks samples invalid, never stops the run) -> advantages ->
`updates_per_rollout` jitted optimizer updates of the trainable pytree (LoRA + focus), a non-finite one
skipped and counted. Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/, DIR/grids/*.png and, at
the end, DIR/export/pytorch_lora_weights.safetensors (+ focus.safetensors).

The three pluggable parts (`model.source`, `data.source`, `judge.source`) are a built-in name or
"package.module:function" (signatures in configs/tiny.py's docstring).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from cogniedit_jax import config as config_lib, parallel
from cogniedit_jax.checkpoint import Checkpoints, abstract_like
from cogniedit_jax.data.errors import DataError
from cogniedit_jax.metrics import MetricsWriter, sample_grid, save_grid
from cogniedit_jax.models import MMDiTConfig, init_params, load_transformer
from cogniedit_jax.models.loading import CONFIG_NAME, transformer_folder
from cogniedit_jax.models.lora import init_lora, save_diffusers_lora
from cogniedit_jax.models.token_focus import init_focus, save_focus
from cogniedit_jax.rl.dense_grpo import dense_grpo_loss
from cogniedit_jax.rl.policy import PolicyConfig, Trainable
from cogniedit_jax.rl.rollout import Rollout, judge_rollout, sample_rollout
from cogniedit_jax.sampling.edit_loop import EditCondition, edit_layout, unpack_latents
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule
from cogniedit_jax.sidecar.client import judge_rewards
from cogniedit_jax.sidecar.rules import get_rule_judge

log = logging.getLogger("cogniedit_jax.train")
EXPORT_FOLDER = "export"


class TrainingError(RuntimeError):
    pass


# --- the editor (frozen model + a decoder to images) ---------------------------------------------------


@dataclasses.dataclass
class Editor:
    """cfg and frozen params of the MMDiT; decode(packed latents [N, S, 4C] (numpy), latent (h, w)) -> uint8
    images [N, H, W, 3] for the judge and the sample grids; vae: (VAEConfig, params) when the editor has one
    (the evaluator encodes sources with it)."""

    cfg: MMDiTConfig
    params: Any
    decode: Callable
    vae: Any = None


def latent_preview(packed, hw, scale: int = 8):
    """A VAE-free picture of packed latents: the first 3 latent channels through tanh, upscaled `scale`x."""
    latents = np.nan_to_num(np.asarray(unpack_latents(np.asarray(packed, np.float32), *hw))[:, :3])
    rgb = np.round(127.5 * (np.tanh(latents) + 1)).astype(np.uint8).transpose(0, 2, 3, 1)
    return rgb.repeat(scale, 1).repeat(scale, 2)


def _model_runtime(config) -> dict:
    m = config.model
    return dict(dtype=m.dtype, remat_policy=m.remat_policy, attention_impl=m.attention_impl)


def random_editor(config, mesh) -> Editor:
    """A randomly initialised MMDiT of `model.arch` (tests, smoke runs) with the latent preview as decoder."""
    arch = dict(config.model.arch)
    arch["axes_dims_rope"] = tuple(arch["axes_dims_rope"])
    cfg = MMDiTConfig(**arch, **_model_runtime(config))
    params = _init_frozen(cfg, mesh, jax.random.key(config.model.seed))
    return Editor(cfg, params, functools.partial(latent_preview, scale=config.model.preview_scale))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_frozen(cfg: MMDiTConfig, mesh, key):
    params = init_params(cfg, key)
    return jax.lax.with_sharding_constraint(params, parallel.frozen_shardings(params, mesh))


def converted_editor(config, mesh) -> Editor:
    """The folder written by convert/qwen_image_edit.py (transformer/ and vae/), each weight read straight
    into its FSDP shard; the VAE (replicated) decodes."""
    from cogniedit_jax.models.vae import denormalize_latents, load_vae, vae_decode

    path = Path(config.model.path)
    runtime = _model_runtime(config)
    cfg = MMDiTConfig.from_json(transformer_folder(path) / CONFIG_NAME, **runtime)
    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    cfg, params = load_transformer(path, shardings=parallel.frozen_shardings(abstract, mesh), **runtime)
    vae_cfg, vae_params = load_vae(path, dtype=config.model.dtype, use_tiling=True)

    def decode(packed, hw):
        latents = denormalize_latents(vae_cfg, unpack_latents(jnp.asarray(packed, jnp.float32), *hw))
        images = vae_decode(vae_cfg, vae_params, latents.astype(vae_cfg.compute_dtype))
        return (
            np.asarray(jnp.round((images.astype(jnp.float32) + 1) * 127.5))
            .astype(np.uint8)
            .transpose(0, 2, 3, 1)
        )

    return Editor(cfg, params, decode, (vae_cfg, vae_params))


def load_editor(config, mesh) -> Editor:
    source = config.model.source
    if source == "random":
        return random_editor(config, mesh)
    if source == "converted":
        return converted_editor(config, mesh)
    editor = config_lib.resolve_plugin("model.source", source)(config)
    shardings = parallel.frozen_shardings(editor.params, mesh)
    return dataclasses.replace(editor, params=jax.device_put(editor.params, shardings))


# --- condition sources -------------------------------------------------------------------------------
# A source iterates over this host's rows of each global batch, as dicts: "cond" (an EditCondition of numpy
# arrays), "layout" (edit_layout: target first), "sources" (uint8 [B, H, W, 3], what the judge compares
# against), "instructions" (list of str), "valid" (bool [B]: False for a row whose example failed to load);
# and has state_dict() / load_state_dict() (JSON-able) for exact resumption.


class StepConditions(abc.ABC):
    """Base of sources whose global batch is a pure function of (seed, step): subclasses define
    `global_batch(step)`; this host gets its rows, and the state is the step. (Plugins may subclass it.)"""

    def __init__(self, config, editor: Editor, process_index: int = 0, process_count: int = 1):
        self.config, self.editor, self.seed, self.step = config, editor, config.seed, 0
        batch = config.data.batch_size
        self.rows = slice(process_index * batch // process_count,
                          (process_index + 1) * batch // process_count)

    @abc.abstractmethod
    def global_batch(self, step: int) -> dict:
        """The whole (all hosts') batch of `step`."""

    def batch_at(self, step: int) -> dict:
        return _host_rows(self.global_batch(step), self.rows)

    def __iter__(self):
        while True:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class RandomConditions(StepConditions):
    """Random text states, masks and source latents: for tests and smoke runs. The source picture is the
    editor's decode of the source latents."""

    def global_batch(self, step: int) -> dict:
        d, cfg = self.config.data, self.editor.cfg
        rng = np.random.default_rng([self.seed, step])
        (h, w), b, length = tuple(d.latent_hw), d.batch_size, d.text_len
        embeds = rng.standard_normal((b, length, cfg.joint_attention_dim), np.float32)
        mask = (np.arange(length) < rng.integers(1, length + 1, (b, 1))).astype(np.int32)
        source = rng.standard_normal((b, (h // 2) * (w // 2), cfg.in_channels), np.float32)
        neg = (rng.standard_normal((b, 2, cfg.joint_attention_dim), np.float32), np.ones((b, 2), np.int32))
        return {
            "cond": EditCondition(embeds, mask, source, *(neg if d.negative_prompt else (None, None))),
            "layout": edit_layout((h, w), [(h, w)]),
            "sources": self.editor.decode(source, (h, w)),
            "instructions": [f"random edit {step}.{i}" for i in range(b)],
            "valid": np.ones(b, bool),
        }


def _host_rows(batch: dict, rows: slice) -> dict:
    take = lambda x: x if x is None else x[rows]  # noqa: E731
    return {
        **batch,
        "cond": jax.tree.map(take, batch["cond"]),
        "sources": batch["sources"][rows],
        "instructions": batch["instructions"][rows],
        "valid": batch["valid"][rows],
    }


class CachedConditions:
    """The manifest's items as `python -m cogniedit_jax.prepare` cached them (`data.cache.CacheReader`): per
    row the packed, normalised source latents, the prompt embeddings and mask padded to `data.max_text_len`
    (0: the cache's longest), the item's own negative-prompt embeddings (the pipeline encodes " " with each
    source image) when the cache has them, the source image at its bucket size, and for the judge the text
    that was encoded (the enhanced answer under prepare's data.use_enhanced, else the instruction: the
    decomposed c_b of Alg. 1, line 11). Manifest items missing from the cache (prepare skipped them or has not
    reached them) are left out and counted ("no_cache"); a record in a missing or damaged shard, or with more
    than max_text_len text tokens, is counted and its row masked out (`valid`)."""

    def __init__(self, config, editor: Editor, process_index: int = 0, process_count: int = 1):
        from cogniedit_jax.data.cache import CacheReader
        from cogniedit_jax.data.loader import Loader
        from cogniedit_jax.data.manifest import read_manifest

        d = config.data
        self.reader = CacheReader(d.cache_dir)
        self.max_len, self.vae_scale = d.max_text_len or self.reader.text_length, d.vae_scale
        # Padded to at least max_len and cut to it: every record has one text shape under jit.
        self.reader.text_length = max(self.reader.text_length, self.max_len)
        items, skips = read_manifest(d.manifest)
        bucket_of = dict(zip(self.reader.ids, self.reader.buckets))
        self.ids = []
        for item in items:
            if item.id in bucket_of:
                self.ids.append(item.id)
            else:
                skips.add(DataError(item.source, "no_cache", f"item {item.id!r} is not in the cache "
                                                             f"{d.cache_dir}: run cogniedit_jax.prepare"))
        if not self.ids:
            raise ValueError(f"no item of data.manifest={d.manifest} is in data.cache_dir={d.cache_dir}; "
                             "run `python -m cogniedit_jax.prepare` with the same config first")
        self.loader = Loader([bucket_of[i] for i in self.ids], self._load, global_batch_size=d.batch_size,
                             seed=config.seed, process_index=process_index, process_count=process_count,
                             num_threads=d.num_threads, skips=skips)

    def _load(self, i: int) -> dict:
        rec = self.reader.read(self.ids[i])
        texts = [k for k in ("prompt", "negative") if f"{k}_mask" in rec]
        for k in texts:
            length = int(rec[f"{k}_mask"].sum())
            if length > self.max_len:
                raise DataError(f"{self.reader.dir} (id {rec['id']!r})", "text_too_long",
                                f"{length} {k} tokens > data.max_text_len={self.max_len}")
        cut = {f"{k}_{p}": rec[f"{k}_{p}"][: self.max_len] for k in texts for p in ("embeds", "mask")}
        return {"latents": rec["latents"], "source": rec["source"], "prompt": rec["prompt"], **cut}

    def __iter__(self):
        for ex in self.loader:
            height, width = ex["source"].shape[1:3]
            hw = (height // self.vae_scale, width // self.vae_scale)
            tokens = ex["latents"].shape[1]
            expected = (hw[0] // 2) * (hw[1] // 2)
            if tokens != expected:
                raise ValueError(f"cached source latents have {tokens} tokens for {height}x{width} sources: "
                                 f"expected {expected} with data.vae_scale={self.vae_scale}")
            cond = EditCondition(ex["prompt_embeds"], ex["prompt_mask"], ex["latents"],
                                 ex.get("negative_embeds"), ex.get("negative_mask"))
            yield {
                "cond": cond,
                "layout": edit_layout(hw, [hw]),  # the target is edited at the source's size
                "sources": ex["source"],
                "instructions": ex["prompt"],
                "valid": ex["valid"],
            }

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def make_conditions(config, editor: Editor):
    source = config.data.source
    make = {"random": RandomConditions, "cache": CachedConditions}.get(source)
    make = make or config_lib.resolve_plugin("data.source", source)
    return make(config, editor, jax.process_index(), jax.process_count())


# --- judges ------------------------------------------------------------------------------------------
# A judge maps (edited uint8 [N, H, W, 3], sources uint8 [N, H, W, 3], instructions [N]) -> (rewards [N],
# valid [N]).


def make_judge(config) -> tuple[Callable, Callable]:
    """(judge, close)."""
    j = config.judge
    if j.source == "rule":
        rule = get_rule_judge(j.rule)

        def judge(edited, sources, instructions):
            items = [
                {"edited": e, "source": s, "instruction": t} for e, s, t in zip(edited, sources, instructions)
            ]
            return judge_rewards(rule.score(items), j.normalization)

        return judge, lambda: None
    if j.source == "sidecar":
        from cogniedit_jax.sidecar.client import SidecarClient

        client = SidecarClient(j.sidecar.to_dict())
        client.start()
        return (lambda e, s, t: judge_rewards(client.judge(e, s, t), j.normalization)), client.close
    return config_lib.resolve_plugin("judge.source", j.source)(config), lambda: None


# --- the jitted core ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimizer as hashable numbers, so the jitted update (which builds it) is cached across runs."""

    lr: float
    warmup_steps: int
    total_updates: int
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float

    @classmethod
    def from_config(cls, config) -> "OptimSpec":
        o = config.optim
        total = config.total_steps * config.updates_per_rollout
        return cls(
            float(o.lr),
            int(o.warmup_frac * total),
            total,
            float(o.b1),
            float(o.b2),
            float(o.eps),
            float(o.weight_decay),
            float(o.grad_clip),
        )

    def build(self) -> optax.GradientTransformation:
        """clip_by_global_norm -> AdamW, lr: linear warm-up, then cosine decay to 0 at the last update."""
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.lr, self.warmup_steps, self.total_updates, 0.0
        )
        adamw = optax.inject_hyperparams(optax.adamw)(
            learning_rate=schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay
        )
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), adamw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def init_state(model: MMDiTConfig, lora_cfg, focus_cfg, optim: OptimSpec, mesh, key):
    """(trainable, optimizer state), replicated: LoRA (B = 0) and focus (gate = 0) leave the model
    unchanged."""
    key_lora, key_focus = jax.random.split(key)
    trainable = Trainable(
        lora=init_lora(model, lora_cfg, key_lora),
        focus=None if focus_cfg is None else init_focus(model, focus_cfg, key_focus),
    )
    state = (trainable, optim.build().init(trainable))
    return jax.lax.with_sharding_constraint(state, parallel.replicated(mesh))


def _training_mode(trainable: Trainable) -> Trainable:
    """The loss differentiates the focus in its training mode (straight-through: the same forward as the
    rollout's hard windows, so the first ratio is still 1)."""
    return trainable if trainable.focus is None else trainable.replace(focus=trainable.focus.training())


def rollout_shardings(mesh, rollout: Rollout):
    """Rows over the whole mesh: axis 1 of the [k(+1), N, ...] window arrays, axis 0 of the rest."""
    windowed = {"noises", "next_states", "old_log_probs", "sigmas"}
    fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout) if f.name != "policy"}
    out = {
        name: jax.tree.map(
            lambda x, axis=int(name in windowed): parallel.rows_sharding(mesh, x.shape, axis), v
        )
        for name, v in fields.items()
    }
    return rollout.replace(**out)


def batch_policy(config, model: MMDiTConfig, layout) -> tuple[PolicyConfig, Any, tuple[int, int]]:
    """(policy, sigmas [T + 1], target latent (h, w)) for a batch of this layout."""
    policy = PolicyConfig(
        model,
        layout,
        num_steps=config.policy.num_steps,
        k=config.policy.k,
        noise_level=config.policy.noise_level,
        cfg_scale=config.policy.cfg_scale,
        reduce=config.policy.reduce,
    )
    target_hw = (layout[0][1] * 2, layout[0][2] * 2)
    sigmas, _ = make_schedule(SchedulerConfig(), policy.num_steps, target_hw[0] * target_hw[1] // 4)
    return policy, sigmas, target_hw


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8))
def rollout_step(mesh, policy, frozen, trainable, cond, sigmas, key, group_size, shared_noise):
    rollout = sample_rollout(policy, frozen, trainable, cond, sigmas, key, group_size, shared_noise)
    return jax.lax.with_sharding_constraint(rollout, rollout_shardings(mesh, rollout))


def loss_and_grad(loss_cfg, trainable, frozen, rollout):
    """((loss, metrics), d loss / d trainable): what an update differentiates."""
    return jax.value_and_grad(
        lambda t: dense_grpo_loss(_training_mode(t), frozen, rollout, loss_cfg), has_aux=True
    )(trainable)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def update_step(optim: OptimSpec, loss_cfg, trainable, opt_state, frozen, rollout):
    """One optimizer update; a non-finite loss or gradient (or no valid sample) leaves trainable and optimizer
    state unchanged."""

    (loss, metrics), grads = loss_and_grad(loss_cfg, trainable, frozen, rollout)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = optim.build().update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Without a single valid sample (the judge was down) there is nothing to learn: no step either, or Adam's
    # momentum and weight decay would still move the params.
    apply = finite & jnp.any(rollout.valid)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(apply, new, old))
    lr = new_opt[1].hyperparams["learning_rate"]
    return (
        keep(new_trainable, trainable),
        keep(new_opt, opt_state),
        {**metrics, "grad_norm": grad_norm, "lr": lr, "finite": finite},
    )


# --- the loop ----------------------------------------------------------------------------------------


class _StopSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step (with a checkpoint)."""

    def __init__(self):
        self.received = None

    @contextlib.contextmanager
    def installed(self):
        if jax.process_count() > 1 or not _main_thread():
            yield self
            return
        handler = lambda signum, frame: setattr(self, "received", signal.Signals(signum).name)  # noqa: E731
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _judge_rows(editor: Editor, judge, final, batch: dict, group: int, target_hw):
    """Decode and judge this host's rows of the rollout -> (rewards [N], valid [N], images [N, H, W, 3] of
    this host's rows). A judge that raises marks its rows invalid."""
    index, rows = parallel.local_rows(final)
    images = editor.decode(rows, target_hw)
    instance = index // group
    try:
        rewards, valid = judge(
            images, batch["sources"][instance], [batch["instructions"][i] for i in instance]
        )
        rewards, valid = np.asarray(rewards, np.float32), np.asarray(valid, bool)
    except Exception as e:  # noqa: BLE001  (a judge failure must not end a long run)
        log.warning("judge failed on %d samples, marked invalid: %s: %s", len(index), type(e).__name__, e)
        rewards, valid = np.full(len(index), np.nan, np.float32), np.zeros(len(index), bool)
    valid &= np.asarray(batch["valid"], bool)[instance]
    index, rewards, valid = parallel.gather_hosts((index, rewards, valid))
    n = final.shape[0]
    all_rewards, all_valid = np.full(n, np.nan, np.float32), np.zeros(n, bool)
    all_rewards[index], all_valid[index] = rewards, valid
    return all_rewards, all_valid, images


def _gather_batch(batch: dict) -> dict:
    """The global batch on every process from each one's rows (the layout is one bucket's, shared)."""
    arrays = parallel.gather_hosts({k: batch[k] for k in ("cond", "sources", "valid")})
    return {**batch, **arrays, "instructions": parallel.gather_texts(batch["instructions"])}


@dataclasses.dataclass(frozen=True)
class JudgedRollout:
    """One step's samples before its updates: the global batch, the rollout with rewards and advantages (laid
    out for the update), the loss config of its policy, the rewards and validity [N], this host's decoded
    images, and the seconds spent sampling and judging."""

    batch: dict
    rollout: Rollout
    loss_cfg: Any
    rewards: np.ndarray
    valid: np.ndarray
    images: np.ndarray
    seconds_rollout: float
    seconds_judge: float


def judged_rollout(config, editor: Editor, judge, mesh, trainable, host_batch: dict, key) -> JudgedRollout:
    """Sample a step's batch (this process's rows: `host_batch`) under `trainable`, judge it and attach the
    advantages: what a training step does before its updates."""
    group = config.rollout.group_size
    batch = _gather_batch(host_batch)
    policy, sigmas, target_hw = batch_policy(config, editor.cfg, batch["layout"])
    repl = parallel.replicated(mesh)
    cond = parallel.put_global(batch["cond"], jax.tree.map(lambda _: repl, batch["cond"]))
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(
        rollout_step(mesh, policy, editor.params, trainable, cond, sigmas, key, group, config.rollout.shared_noise)
    )
    t1 = time.perf_counter()
    rewards, valid, images = _judge_rows(editor, judge, rollout.final, batch, group, target_hw)
    rollout = judge_rollout(rollout, lambda _: (rewards, valid), group, config.loss.advantage_mode)
    rollout = jax.device_put(rollout, rollout_shardings(mesh, rollout))
    return JudgedRollout(batch, rollout, config_lib.loss_config(config, policy), rewards, valid, images,
                         t1 - t0, time.perf_counter() - t1)


def train(config, workdir) -> dict:
    """Run (or resume) the training described by `config` in `workdir`; returns the last step's metrics."""
    config_lib.validate(config)
    parallel.maybe_initialize_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    editor = load_editor(config, mesh)
    conditions = make_conditions(config, editor)
    judge, close_judge = make_judge(config)
    optim = OptimSpec.from_config(config)
    group = config.rollout.group_size

    repl = parallel.replicated(mesh)
    init_key, key = jax.random.split(jax.random.key(config.seed))
    init = functools.partial(
        init_state, editor.cfg, config_lib.lora_config(config), config_lib.focus_config(config), optim, mesh
    )

    ckpt = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep)
    step, counters = 0, {"skipped_updates": 0, "bad_in_a_row": 0, "invalid_rewards": 0, "bad_examples": 0}
    latest = ckpt.latest_step()
    if latest is None:
        trainable, opt_state = init(init_key)
    else:
        abstract_state = jax.eval_shape(init, init_key)
        arrays = {
            "trainable": abstract_state[0],
            "opt_state": abstract_state[1],
            "key": jax.eval_shape(jax.random.key_data, key),
        }
        restored, meta = ckpt.restore(latest, abstract_like(arrays, jax.tree.map(lambda _: repl, arrays)))
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        key = jax.random.wrap_key_data(restored["key"])
        conditions.load_state_dict(meta["data"])
        step, counters = int(meta["step"]), dict(meta["counters"])
        log.info("resumed from %s at step %d", ckpt.directory / str(latest), step)

    def save():
        ckpt.save(
            step,
            {"trainable": trainable, "opt_state": opt_state, "key": jax.random.key_data(key)},
            {"step": step, "data": conditions.state_dict(), "counters": counters, "config": config.to_json()},
        )

    writer = MetricsWriter(workdir, resume_step=step) if jax.process_index() == 0 else None
    end = min(config.total_steps, config.stop_after or config.total_steps)
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        disable=not config.log.progress or jax.process_index() > 0,
        desc="train",
        dynamic_ncols=True,
    )
    batches = iter(conditions)
    metrics, stop = {}, _StopSignal()
    try:
        with stop.installed():
            while step < end and stop.received is None:
                key, rollout_key = jax.random.split(key)
                sampled = judged_rollout(config, editor, judge, mesh, trainable, next(batches), rollout_key)
                batch, rewards, valid, images = sampled.batch, sampled.rewards, sampled.valid, sampled.images
                t2 = time.perf_counter()
                updates = []
                for _ in range(config.updates_per_rollout):
                    trainable, opt_state, m = update_step(
                        optim, sampled.loss_cfg, trainable, opt_state, editor.params, sampled.rollout
                    )
                    updates.append(jax.device_get(m))
                t3 = time.perf_counter()

                step += 1
                finite = [bool(u["finite"]) for u in updates]
                counters["skipped_updates"] += finite.count(False)
                counters["bad_in_a_row"] = (
                    0 if all(finite) else counters["bad_in_a_row"] + finite.count(False)
                )
                counters["invalid_rewards"] += int((~valid).sum())
                counters["bad_examples"] += int((~np.asarray(batch["valid"])).sum())
                good = rewards[valid]
                mean = lambda name: float(np.mean([u[name] for u in updates]))  # noqa: E731
                metrics = {
                    "loss": mean("loss"),
                    "policy_loss": mean("policy_loss"),
                    "reward_mean": float(good.mean()) if good.size else float("nan"),
                    "reward_std": float(good.std()) if good.size else float("nan"),
                    "ratio_first": float(updates[0]["ratio_mean"]),
                    "clipfrac": mean("clipfrac"),
                    "kl": mean("kl"),
                    "grad_norm": mean("grad_norm"),
                    "lr": float(updates[-1]["lr"]),
                    "invalid_rewards": int((~valid).sum()),
                    "skipped_updates": finite.count(False),
                    "bad_examples": int((~np.asarray(batch["valid"])).sum()),
                    "seconds_rollout": sampled.seconds_rollout,
                    "seconds_judge": sampled.seconds_judge,
                    "seconds_update": t3 - t2,
                }
                if writer is not None:
                    writer.write(step, metrics)
                    if config.log.grid_every and (step % config.log.grid_every == 0 or step == 1):
                        _write_grid(
                            writer, workdir, step, batch, images, rewards, group, config.log.grid_rows
                        )
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3g}", loss=f"{metrics['loss']:.3g}")
                if counters["bad_in_a_row"] >= config.max_bad_updates:
                    save()
                    raise TrainingError(
                        f"{counters['bad_in_a_row']} non-finite updates in a row (max_bad_updates="
                        f"{config.max_bad_updates}) at step {step}: stopped with a checkpoint in "
                        f"{ckpt.directory}. "
                        "Lower optim.lr or loss.clip_eps, or check the judge's rewards, then rerun to resume."
                    )
                if step % config.checkpoint.every == 0:
                    save()
            save()
            if step >= config.total_steps and jax.process_index() == 0:
                export = workdir / EXPORT_FOLDER
                save_diffusers_lora(trainable.lora, editor.cfg, export)
                if trainable.focus is not None:
                    save_focus(trainable.focus, export)
            if stop.received:
                log.warning(
                    "%s: stopped after step %d with a checkpoint; rerun the same command to resume",
                    stop.received,
                    step,
                )
    finally:
        bar.close()
        close_judge()
        if writer is not None:
            writer.close()
        ckpt.close()
    return {
        "step": step,
        **metrics,
        **{k: v for k, v in counters.items() if k != "bad_in_a_row"},
        "interrupted": stop.received,
    }


def _write_grid(
    writer: MetricsWriter, workdir: Path, step: int, batch: dict, images, rewards, group: int, rows: int
) -> None:
    """The first `rows` instances of this host's rows: source | G edits with rewards."""
    rows = min(rows, len(images) // group)
    edits = images[: rows * group].reshape(rows, group, *images.shape[1:])
    grid = sample_grid(
        batch["sources"][:rows],
        edits,
        rewards[: rows * group].reshape(rows, group),
        batch["instructions"][:rows],
    )
    save_grid(workdir / "grids" / f"step_{step:06d}.png", grid)
    writer.image("samples", step, grid)


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """(config spec, workdir, overrides) from --config PATH[:ARG] --workdir DIR --config.FIELD=VALUE ..."""
    spec = workdir = None
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--config", "--workdir"):
            if not eq:
                i += 1
                if i == len(argv):
                    raise config_lib.ConfigError(f"{name} needs a value")
                value = argv[i]
            spec, workdir = (value, workdir) if name == "--config" else (spec, value)
        elif arg.startswith("--config."):
            overrides.append(arg.removeprefix("--config."))
        else:
            raise config_lib.ConfigError(
                f"unknown argument {arg!r}; usage: python -m cogniedit_jax.train "
                "--config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]"
            )
        i += 1
    if spec is None or workdir is None:
        raise config_lib.ConfigError("both --config and --workdir are required")
    return spec, workdir, overrides


def main(argv=None) -> int:
    # orbax imports absl, whose handler on the root logger makes basicConfig a no-op: give ours its own.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        spec, workdir, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        config = config_lib.load_config(spec, overrides)
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, workdir)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("done: %s", {k: v for k, v in result.items() if not k.startswith("seconds")})
    return 0


if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, a second copy of the module next to the `cogniedit_jax.train`
    # that plugins import (their StepConditions, the rule registry): run that one.
    from cogniedit_jax.train import main as canonical_main

    sys.exit(canonical_main())
