"""Edit, judge and report a benchmark in one command, resumably:

    python -m cogniedit_jax.eval --config configs/base.py --bench gedit --data GEdit-Bench/ --out runs/gedit-base
    python -m cogniedit_jax.eval --config configs/base.py --bench kris --data Kris_Bench/ --out runs/kris-lora \
        --lora runs/train/lora --reason

The sidecar (the config's `judge.sidecar` settings; spawned unless they give a `url`) serves the judge's
/chat (`--chat`, default: its `judge` model), the condition encoder (`--encoder`: the Qwen-Image-Edit pipeline
folder) and, for `--reason`, the decomposer (`--decomposer`), which rewrites each instruction first (the
paper's "-r1"). `--rule-chat module:fn` judges in process instead: fn(turns, attempt) -> answers.
`--editor module:fn` replaces the model: fn(config, lora, args) -> edit_fn(images uint8 [B, H, W, 3],
instructions) -> uint8 [B, H', W', 3]. `--lora` takes the trainer's export folder (LoRA, and the token focus
when focus.safetensors is there).
`--bench shapes --data SEED:N` runs the demo's shapes world instead: the demo editor (`--demo-editor DIR`,
default: the shipped weights) at the world's image size, judged by its rule judge, no sidecar.
Run again with the same --out to continue: finished items are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cogniedit_jax.data.buckets import TARGET_AREA
from cogniedit_jax.eval import aggregate, gedit, kris, report, runner, scoring, shapes

BENCHES = {"gedit": (gedit.load_gedit, scoring.judge_gedit, aggregate.gedit_summary),
           "kris": (kris.load_kris, scoring.judge_kris, aggregate.kris_summary),
           "shapes": (shapes.load_shapes, shapes.judge_shapes, shapes.shapes_summary)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogniedit_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a training config file (configs/X.py[:ARG])")
    p.add_argument("--bench", required=True, choices=sorted(BENCHES))
    p.add_argument("--data", required=True, help="the benchmark's local folder (shapes: SEED:N)")
    p.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    p.add_argument("--lora", help="a LoRA folder/file written by save_diffusers_lora")
    p.add_argument("--reason", action="store_true", help="rewrite instructions with the decomposer first (-r1)")
    p.add_argument("--label", help="the row name in the report (default: from --lora/--reason)")
    p.add_argument("--batch-size", type=int, default=1, help="items per edit call (one resolution bucket)")
    p.add_argument("--limit", type=int, default=0, help="only the first N items (smoke runs)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's 50; shapes: 8)")
    p.add_argument("--demo-editor", metavar="DIR", help="shapes: a demo editor folder (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-retries", type=int, default=2, help="sampled re-asks of an unreadable answer")
    p.add_argument("--judge-max-new-tokens", type=int, default=512)
    p.add_argument("--target-area", type=int, default=TARGET_AREA,
                   help="edit at about this many pixels (the pipeline's 1024*1024; smaller for smoke runs)")
    p.add_argument("--encoder", metavar="DIR", help="sidecar condition encoder: the Qwen-Image-Edit folder")
    p.add_argument("--chat", metavar="DIR", help="sidecar judge model for /chat (default: judge.sidecar.judge)")
    p.add_argument("--decomposer", metavar="DIR", help="sidecar decomposer for --reason")
    p.add_argument("--editor", metavar="MODULE:FN", help="use this editor instead of the config's model")
    p.add_argument("--rule-chat", metavar="MODULE:FN", help="an in-process judge: fn(turns, attempt) -> answers")
    p.add_argument("--config-override", action="append", default=[], metavar="FIELD=VALUE")
    return p


def _plugin(spec: str):
    from cogniedit_jax.config import resolve_plugin

    return resolve_plugin("--editor/--rule-chat", spec)


def _sidecar(config, args):
    """A client for the roles this run needs, and only those (a spawned sidecar loads nothing else)."""
    from cogniedit_jax.sidecar.client import SidecarClient

    settings = dict(config.judge.sidecar)
    settings.setdefault("spawn", "url" not in settings)
    world = args.bench == "shapes"  # rule judge and demo editor: no model roles
    model_judge, model_edit = not (args.rule_chat or world), not (args.editor or world)
    roles = {"chat": args.chat or settings.get("chat") or settings.get("judge") if model_judge else None,
             "encoder": args.encoder or settings.get("encoder") if model_edit else None,
             "decomposer": args.decomposer or settings.get("decomposer") if args.reason else None}
    if settings["spawn"]:
        for role, needed in (("chat", model_judge), ("encoder", model_edit), ("decomposer", args.reason)):
            if needed and not roles[role]:
                raise SystemExit(f"the sidecar needs a {role} model: pass --{role} DIR (or set "
                                 f"judge.sidecar.{role} in the config)")
    settings.update(roles, judge=None, rule_judge=None)
    return SidecarClient(settings)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s eval %(levelname)s %(message)s")
    from cogniedit_jax.config import load_config

    config = load_config(args.config, args.config_override)
    load, judge, summarize = BENCHES[args.bench]
    items = load(args.data)
    if args.limit:
        items = items[:args.limit]
    shapes_world = args.bench == "shapes"
    steps = args.steps or (8 if shapes_world else 50)
    client = None
    if args.reason or not shapes_world and not (args.rule_chat and args.editor):
        client = _sidecar(config, args)
        client.start()
    try:
        if args.rule_chat:
            chat = _plugin(args.rule_chat)
        else:
            def chat(turns, attempt):
                return client.chat(turns, args.judge_max_new_tokens, temperature=0.7 if attempt else None,
                                   top_p=0.9 if attempt else None, seed=args.seed + attempt if attempt else None)
        if args.editor:
            edit_fn = _plugin(args.editor)(config, args.lora, args)
        elif shapes_world:
            edit_fn = shapes.demo_editor(args.lora, args.demo_editor, steps, args.seed)
        else:
            from cogniedit_jax.eval.editor import model_editor

            edit_fn = model_editor(config, args.lora, client, steps, args.seed)
        reason_fn = client.decompose if args.reason else None
        records = runner.run_items(
            items, args.out, edit_fn, lambda its, srcs, eds: judge(chat, its, srcs, eds, args.judge_retries),
            batch_size=args.batch_size, reason_fn=reason_fn, target_area=None if shapes_world else args.target_area)
    finally:
        if client is not None:
            client.close()
    label = args.label or ("base" if not args.lora else "LoRA") + ("-r1" if args.reason else "")
    path = report.write_report(args.bench, summarize(records), records, args.out, label)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
