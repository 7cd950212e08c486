"""The paper's run (section 4.1.3) on the real Qwen-Image-Edit: LoRA rank 4, AdamW lr 1e-5, batch 4, 500
steps, 10 % linear warm-up then cosine, gradient clipping 1.0, k = 5, xi = 64, on 8 GPUs (mesh data 1 x
fsdp 8).

    python convert/qwen_image_edit.py --transformer QIE/transformer --vae QIE/vae --out /ckpt/qie-jax
    python -m cogniedit_jax.prepare --config configs/base.py            # the cache in data.cache_dir
    python -m cogniedit_jax.train --config configs/base.py --workdir runs/base \\
        --config.model.path=/ckpt/qie-jax --config.data.manifest=train.jsonl --config.data.cache_dir=cache \\
        --config.judge.sidecar.judge=/ckpt/Qwen2.5-VL-7B-Instruct

Not given by the paper, our choices: T = 10 sampling steps per rollout (Flow-GRPO's training setting), G = 4
samples per instance (16 rows: 2 per GPU), SDE noise level 0.7, PPO clip 1e-4 with per-element mean
log-densities and KL weight 0.004 (Flow-GRPO's), true CFG 4.0 (the edit pipeline's default), batch-level
advantages (the paper's section 3.1). Field meanings: configs/tiny.py.

Read by prepare only (cogniedit_jax/prepare.py's docstring): the top-level `sidecar` group (the condition
encoder: the original Qwen-Image-Edit pipeline folder; the paper's decomposer PeBR-R1-7B, section 4.1.1) and
data.decompose / use_enhanced / encode_batch / shard_size. The trainer reads the cache prepare writes.
"""

import ml_collections

from cogniedit_jax.models.lora import DEFAULT_TARGETS


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 500
    c.updates_per_rollout = 1
    c.stop_after = 0
    c.max_bad_updates = 10
    c.model = dict(
        source="converted",
        path="/ckpt/qie-jax",
        dtype="bfloat16",
        remat_policy="full",
        attention_impl="cudnn",
        arch=dict(),
        seed=0,
        preview_scale=8,
    )
    c.lora = dict(rank=4, alpha=4.0, targets=DEFAULT_TARGETS)
    c.focus = dict(enabled=True, xi=64, predictor_dim=64, train_mode="straight_through")
    c.policy = dict(num_steps=10, k=5, noise_level=0.7, cfg_scale=4.0, reduce="mean")
    c.loss = dict(mode="dense", clip_eps=1e-4, beta=0.004, advantage_mode="batch")
    c.rollout = dict(group_size=4, shared_noise=False)
    c.data = dict(
        source="cache",
        batch_size=4,
        latent_hw=(0, 0),
        text_len=0,
        negative_prompt=True,
        manifest="train.jsonl",
        cache_dir="cache",
        max_text_len=1024,
        target_area=1024 * 1024,
        num_threads=8,
        vae_scale=8,
        decompose=True,  # Alg. 1, line 4: every instruction goes through the MLLM ...
        use_enhanced=True,  # ... and its enhanced answer replaces it (section 4.1.1)
        encode_batch=8,
        shard_size=32,
    )
    c.sidecar = dict(
        spawn=True,
        encoder="/ckpt/Qwen-Image-Edit",
        decomposer="/ckpt/PeBR-R1-7B",
        device="auto",
        timeout_s=600.0,
        log_file="prepare_sidecar.log",
    )
    c.judge = dict(
        source="sidecar",
        rule="",
        normalization="sum",
        sidecar=dict(
            spawn=True,
            judge="/ckpt/Qwen2.5-VL-7B-Instruct",
            device="auto",
            timeout_s=600.0,
            log_file="sidecar.log",
        ),
    )
    c.optim = dict(lr=1e-5, warmup_frac=0.1, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.mesh = dict(data=1, fsdp=-1)
    c.checkpoint = dict(every=25, keep=3)
    c.log = dict(progress=True, grid_every=25, grid_rows=4)
    return c
