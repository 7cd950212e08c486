"""A tiny random MMDiT trained for a few steps on CPU with an in-process rule judge: the tests' config.

    python -m cogniedit_jax.train --config configs/tiny.py --workdir /tmp/tiny

Config schema (every training config defines all of these; `--config.GROUP.FIELD=VALUE` overrides one):

seed                   rollout noise, window starts, init of LoRA/focus and the data order all derive from it
total_steps            rollouts (training steps); the lr schedule spans total_steps * updates_per_rollout
updates_per_rollout    optimizer updates on each rollout (ratio_first is the first one's mean ratio: 1)
stop_after             0, or end this invocation after that global step with a checkpoint (preemptible jobs)
max_bad_updates        non-finite updates in a row before the run stops (with a checkpoint)
model.source           "random" (model.arch, random weights, latent-preview decoder), "converted"
                       (model.path: convert/qwen_image_edit.py's folder with transformer/ and vae/) or
                       "package.module:function": fn(config) -> train.Editor(cfg, params, decode)
                       with decode(packed latents [N, S, 4C] numpy, latent (h, w)) -> uint8 [N, H, W, 3]
model.dtype / remat_policy / attention_impl    how the MMDiT runs (MMDiTConfig fields)
model.arch, model.seed, model.preview_scale    "random" only: MMDiTConfig fields, init seed, preview upscale
lora.rank / alpha / targets                    the LoRA (PEFT target names)
focus.enabled / xi / predictor_dim / train_mode    token focus (paper 3.2); xi = the paper's xi
policy.num_steps / k / noise_level / cfg_scale / reduce    the sampling policy (rl.policy.PolicyConfig)
loss.mode / clip_eps / beta / advantage_mode   "dense" or "standard" GRPO; PPO eps; KL weight; "batch" ...
rollout.group_size     G samples per instance
rollout.shared_noise   the G samples share their initial noise: they differ only inside the window
data.source            "random" (data.latent_hw, data.text_len, data.negative_prompt), "cache" (the items of
                       data.manifest in the cache `python -m cogniedit_jax.prepare` wrote to data.cache_dir;
                       data.max_text_len (0: the cache's longest), data.num_threads, data.vae_scale; prepare
                       reads data.target_area, data.negative_prompt and more: see its docstring)
                       or "package.module:function": fn(config, editor, process_index, process_count) -> an
                       iterable of batch dicts {"cond": EditCondition (numpy), "layout": edit_layout(...),
                       "sources": uint8 [B, H, W, 3], "instructions": [str] * B, "valid": bool [B]} with
                       state_dict() / load_state_dict() for resumption
data.batch_size        global batch (instances per step; rows = batch_size * group_size)
judge.source           "rule" (judge.rule: a registered rule judge NAME or "module:NAME"), "sidecar"
                       (judge.sidecar: SidecarConfig fields) or "package.module:function": fn(config) ->
                       judge(edited uint8 [N, H, W, 3], sources, instructions) -> (rewards [N], valid [N])
judge.normalization    reward scale: "sum" (3-15, the paper's), "mean" or "unit"
optim.lr / warmup_frac / weight_decay / b1 / b2 / eps / grad_clip    AdamW, warm-up then cosine, clipping
mesh.data / mesh.fsdp  device mesh (-1: the remaining devices); data x fsdp = device count
checkpoint.every / keep                        save every N steps (and at the end); keep the last K
log.progress / grid_every / grid_rows          progress bar; sample grid PNG every N steps (0: never)

Groups may carry more fields for a plugin (the demo's config adds its own); the trainer reads only these.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 4
    c.updates_per_rollout = 1
    c.stop_after = 0
    c.max_bad_updates = 5
    c.model = dict(
        source="random",
        path="",
        dtype="float32",
        remat_policy="none",
        attention_impl="xla",
        arch=dict(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            axes_dims_rope=(4, 6, 6),
        ),
        seed=0,
        preview_scale=4,
    )
    c.lora = dict(
        rank=2,
        alpha=2.0,
        targets=(
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        ),
    )
    c.focus = dict(enabled=True, xi=3, predictor_dim=8, train_mode="straight_through")
    c.policy = dict(num_steps=4, k=2, noise_level=0.7, cfg_scale=4.0, reduce="mean")
    c.loss = dict(mode="dense", clip_eps=1e-3, beta=0.004, advantage_mode="batch")
    c.rollout = dict(group_size=2, shared_noise=False)
    c.data = dict(
        source="random",
        batch_size=4,
        latent_hw=(8, 8),
        text_len=6,
        negative_prompt=False,
        manifest="",
        cache_dir="",
        max_text_len=0,
        target_area=0,
        num_threads=0,
        vae_scale=8,
    )
    c.judge = dict(source="rule", rule="pixel_stats", normalization="sum", sidecar=dict())
    c.optim = dict(lr=1e-3, warmup_frac=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.mesh = dict(data=1, fsdp=-1)
    c.checkpoint = dict(every=2, keep=2)
    c.log = dict(progress=False, grid_every=2, grid_rows=2)
    return c
