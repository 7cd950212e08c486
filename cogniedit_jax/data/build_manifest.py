"""Turn a data source into the JSONL manifest.

    python -m cogniedit_jax.data.build_manifest --source seed --root SEED-Data-Edit-Part2-3 --n 3000 \
        --out seed.jsonl
    python -m cogniedit_jax.data.build_manifest --source coco \
        --annotations annotations/instances_train2017.json --images train2017 --targets coco_targets \
        --n 1000 --out coco.jsonl
    python -m cogniedit_jax.data.build_manifest --source folder --root my_pairs --out mine.jsonl

Skipped items are counted and listed on stderr (each message names the file and line). Exit status: 0 when a
manifest was written, 1 when no item was usable, 2 when the data set is not where or what it was said to be.
"""

from __future__ import annotations

import argparse
import sys

from cogniedit_jax.data.coco_pairs import DEFAULT_ALPHA, read_coco
from cogniedit_jax.data.folder import read_folder
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS
from cogniedit_jax.data.manifest import write_manifest
from cogniedit_jax.data.seed_edit import read_seed_edit


def build(args) -> tuple[list, object]:
    if args.source == "seed":
        return read_seed_edit(args.root, n=args.n, seed=args.seed, images=args.images,
                              max_pixels=args.max_pixels)
    if args.source == "coco":
        return read_coco(args.annotations, args.images, args.targets, n=args.n, seed=args.seed,
                         alpha=args.alpha, max_pixels=args.max_pixels)
    return read_folder(args.root, max_pixels=args.max_pixels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("seed", "coco", "folder"), required=True)
    p.add_argument("--out", required=True, help="manifest to write (JSONL)")
    p.add_argument("--root", help="seed: the SEED-Data-Edit-Part2-3 folder; folder: the folder of pairs")
    p.add_argument("--images", help="coco: the image folder (train2017/); seed: override real_editing/images")
    p.add_argument("--annotations", help="coco: instances_*.json")
    p.add_argument("--targets", help="coco: folder for the rendered green-mask targets")
    p.add_argument("--n", type=int, default=None, help="how many pairs to sample (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="coco: opacity of the green mask")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    args = p.parse_args(argv)
    need = {"seed": ("root",), "coco": ("annotations", "images", "targets"), "folder": ("root",)}[args.source]
    missing = [f"--{k}" for k in need if getattr(args, k) is None]
    if missing:
        p.error(f"--source {args.source} needs {' '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        items, skips = build(args)
    except (FileNotFoundError, ValueError) as e:  # no data set where it was said to be, or not in its format
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skips.total:
        print(skips.summary(), file=sys.stderr)
    if not items:
        print(f"no usable items from --source {args.source}; nothing written", file=sys.stderr)
        return 1
    n = write_manifest(args.out, items)
    print(f"wrote {n} items to {args.out} ({skips.total} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
