"""The embedded demo: dense GRPO + token focus on the pretrained demo editor (cogniedit_jax/demo/weights),
judged by the shapes world's pixel-analysis rule judge, on CPU.

    python -m cogniedit_jax.demo.run --workdir /tmp/demo            # train, then judge before/after
    python -m cogniedit_jax.train --config configs/demo.py --workdir /tmp/demo   # the training part alone

Schema: configs/tiny.py's docstring. Demo fields: model.path ("" = the shipped editor), data.enhanced (the
editor reads the rule decomposer's explicit instruction; the judge the original), data.combine_p (two-clause
instructions), eval.* (the held-out judge run of `demo.run`: a seed training never draws from).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 300
    c.updates_per_rollout = 1
    c.stop_after = 0
    c.max_bad_updates = 5
    c.model = dict(source="cogniedit_jax.demo.plugin:editor", path="", dtype="float32", remat_policy="none",
                   attention_impl="xla", arch=dict(), seed=0, preview_scale=1)
    c.lora = dict(rank=8, alpha=8.0,
                  targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                           "img_mlp.net.2"))
    c.focus = dict(enabled=True, xi=4, predictor_dim=16, train_mode="straight_through")
    c.policy = dict(num_steps=8, k=2, noise_level=0.7, cfg_scale=1.0, reduce="mean")
    c.loss = dict(mode="dense", clip_eps=1e-3, beta=0.004, advantage_mode="group_centered")
    c.rollout = dict(group_size=8, shared_noise=False)
    c.data = dict(source="cogniedit_jax.demo.plugin:conditions", batch_size=4, enhanced=False, combine_p=0.2,
                  latent_hw=(0, 0), text_len=0, negative_prompt=False, manifest="", cache_dir="",
                  max_text_len=0, target_area=0, num_threads=0, vae_scale=1)
    c.judge = dict(source="rule", rule="cogniedit_jax.data.shapes:shapes", normalization="sum",
                   sidecar=dict())
    c.optim = dict(lr=1e-3, warmup_frac=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.mesh = dict(data=1, fsdp=-1)
    c.checkpoint = dict(every=50, keep=1)
    c.log = dict(progress=True, grid_every=50, grid_rows=4)
    c.eval = dict(seed=20_000, num=96, steps=8, grid=12)
    if arg == "smoke":
        c.total_steps, c.data.batch_size, c.rollout.group_size = 2, 2, 2
        c.eval.num, c.eval.grid = 4, 2
        c.log.progress = False
    return c
