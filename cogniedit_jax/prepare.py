"""Prepare training examples once: manifest -> (decomposer) -> condition encoder + VAE -> the on-disk cache.

    python -m cogniedit_jax.prepare --config CONFIG [--config.data.decompose=True ...]

Per manifest item: the source image is decoded (`data.images.load_rgb`) and resized as the edit pipeline does
it (`data.buckets`); with `data.decompose` the sidecar's MLLM decomposer rewrites items that have no enhanced
parts yet; the sidecar's condition encoder embeds the prompt (and the negative prompt, for true CFG) with the
~1 MP source image; the VAE encodes the source at its bucket size (jitted, one batch per bucket) into packed,
normalised latents. Records go to a `data.cache.CacheWriter`, so a rerun skips finished items. A bad item (an
unreadable image, an extreme aspect ratio, a refusal by the sidecar, non-finite outputs) is counted and
skipped; the report (JSON) says which and why.

The prompt that is encoded: the paper replaces every instruction with the MLLM's knowledge-enhanced one
(section 4.1.1: "This enhanced instruction replaces the original one"; appendix 9: the <answer> part is "an
enriched editing instruction synthesizing original command and visual context"), so with `data.use_enhanced`
(default) the `answer` part is encoded where an item has one, from the manifest or from the decomposer;
otherwise, and when the decomposer gave no answer, the original instruction.

Config fields read (defaults in brackets): data.manifest, data.cache_dir, data.negative_prompt (a string,
True for the pipeline's " ", False/None for none) [" "], data.target_area (0: the pipeline's 1024²),
data.num_threads (0: 8), data.decompose [False], data.use_enhanced [True], data.encode_batch [8],
data.shard_size [32], data.max_pixels, data.enhanced_manifest [CACHE/manifest.enhanced.jsonl],
data.report [CACHE/prepare_report.json]; model.vae or model.path (the converted folder); the sidecar:
`sidecar` or else `judge.sidecar` (SidecarConfig fields; it must serve the encoder, and the decomposer when
decompose is on).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cogniedit_jax.config import load_config
from cogniedit_jax.data.buckets import TARGET_AREA, edit_dimensions, resize_to
from cogniedit_jax.data.cache import CacheReader, CacheRecord, CacheWriter
from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS, load_rgb
from cogniedit_jax.data.manifest import ENHANCED_PARTS, Enhanced, ManifestItem, read_manifest, write_manifest
from cogniedit_jax.models.vae import load_vae, normalize_latents, vae_encode
from cogniedit_jax.sampling.edit_loop import pack_latents
from cogniedit_jax.sidecar.client import SidecarClient, SidecarRequestError

PIPELINE_NEGATIVE_PROMPT = " "  # what the Qwen-Image-Edit examples pass to enable true CFG


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    manifest: str
    cache_dir: str
    vae: str
    sidecar: dict
    negative_prompt: str | None = PIPELINE_NEGATIVE_PROMPT
    target_area: int = TARGET_AREA
    num_threads: int = 8
    decompose: bool = False
    use_enhanced: bool = True
    encode_batch: int = 8
    shard_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    enhanced_manifest: str = ""
    report: str = ""

    @classmethod
    def from_config(cls, config) -> PrepareOptions:
        """Reads the fields the module docstring lists; missing optional fields take their defaults."""
        data, model = config.data, config.model
        missing = [f"data.{k}" for k in ("manifest", "cache_dir") if not data.get(k)]
        vae = model.get("vae") or model.get("path")
        if not vae:
            missing.append("model.vae (or model.path)")
        sidecar = config.get("sidecar") or config.get("judge", {}).get("sidecar")
        if not sidecar:
            missing.append("sidecar (or judge.sidecar)")
        if missing:
            raise ValueError(f"prepare needs config field(s) {missing}")
        neg = data.get("negative_prompt", PIPELINE_NEGATIVE_PROMPT)
        neg = PIPELINE_NEGATIVE_PROMPT if neg is True else (neg or None)
        optional = {f.name: data.get(f.name) for f in dataclasses.fields(cls)
                    if f.name in ("decompose", "use_enhanced", "encode_batch", "shard_size", "max_pixels",
                                  "enhanced_manifest", "report") and data.get(f.name) is not None}
        return cls(manifest=str(data.manifest), cache_dir=str(data.cache_dir), vae=str(vae),
                   sidecar=sidecar.to_dict() if hasattr(sidecar, "to_dict") else dict(sidecar),
                   negative_prompt=neg, target_area=data.get("target_area") or TARGET_AREA,
                   num_threads=data.get("num_threads") or 8, **optional)

    def settings(self) -> dict:
        """What determines the cache's contents (a cache refuses to be resumed with other settings)."""
        return {"vae": str(Path(self.vae).resolve()), "encoder": self.sidecar.get("encoder"),
                "decomposer": self.sidecar.get("decomposer") if self.decompose else None,
                "negative_prompt": self.negative_prompt, "target_area": self.target_area,
                "use_enhanced": self.use_enhanced, "latents": "packed, normalised"}


@functools.partial(jax.jit, static_argnums=0)
def source_latents(vae_cfg, vae_params, images):
    """uint8 [B, H, W, 3] -> the edit loop's source latents [B, (H/16)(W/16), 4 z_dim]: the pipeline's
    preprocessing (x / 255 * 2 - 1), the posterior mean, (z - mean) / std, 2x2 packing."""
    x = jnp.transpose(images.astype(jnp.float32) / 255.0 * 2.0 - 1.0, (0, 3, 1, 2))
    return pack_latents(normalize_latents(vae_cfg, vae_encode(vae_cfg, vae_params, x)))


@dataclasses.dataclass(eq=False)  # compared by identity: it holds arrays
class Example:
    item: ManifestItem
    condition: np.ndarray  # uint8, the ~1 MP image the encoder and decomposer see (the pipeline's)
    pixels: np.ndarray  # uint8 [H, W, 3] at the bucket size (H, W): what the VAE encodes
    prompt: str = ""
    enhanced: Enhanced | None = None


def decode_example(item: ManifestItem, opts: PrepareOptions) -> Example | DataError:
    try:
        img = load_rgb(item.source, opts.max_pixels)
        try:
            condition = resize_to(img, *edit_dimensions(img.width, img.height))
            size = edit_dimensions(img.width, img.height, opts.target_area)
        except ValueError as e:
            raise DataError(item.source, "bad_aspect", str(e))
        pixels = condition if size == condition.size else resize_to(img, *size)
        return Example(item, np.asarray(condition), np.asarray(pixels))
    except DataError as err:
        return err


def _bucket_batches(decoded, size: int, skips: SkipLog, bar):
    """Lists of up to `size` examples of one bucket, in the order buckets fill up; the rest at the end."""
    pending = collections.defaultdict(list)
    for ex in decoded:
        if isinstance(ex, DataError):
            skips.add(ex)
            bar.update(1)
            continue
        group = pending[ex.pixels.shape]
        group.append(ex)
        if len(group) == size:
            yield pending.pop(ex.pixels.shape)
    yield from pending.values()


def _per_item(call, examples: list[Example], skips: SkipLog, what: str) -> tuple[list, list[Example]]:
    """call(examples) -> one result each; when the sidecar refuses a batch, its items are tried one by one so
    only the refused ones are skipped. Returns (results, examples) of the items that went through."""
    try:
        return call(examples), examples
    except SidecarRequestError as e:
        if e.status == 404:  # the endpoint itself is missing: no item would go through
            raise
        if len(examples) == 1:
            ex = examples[0]
            skips.add(DataError(ex.item.source, "sidecar", f"{what} of item {ex.item.id!r} refused: {e}"))
            return [], []
    results, kept = [], []
    for ex in examples:
        r, k = _per_item(call, [ex], skips, what)
        results, kept = results + r, kept + k
    return results, kept


def _complete(result: dict) -> Enhanced | None:
    parts = {k: (result.get(k) or "").strip() for k in ENHANCED_PARTS}
    return Enhanced(**parts) if all(parts.values()) else None


class Preparer:
    def __init__(self, opts: PrepareOptions, client: SidecarClient, vae, skips: SkipLog):
        self.opts, self.client, self.skips = opts, client, skips
        self.vae_cfg, self.vae_params = vae
        self.stats = collections.Counter()

    def choose_prompts(self, examples: list[Example]) -> list[Example]:
        """Sets each example's prompt (and enhanced parts), calling the decomposer where configured."""
        ask = [ex for ex in examples if ex.item.enhanced is None] if self.opts.decompose else []
        results, asked = _per_item(
            lambda exs: self.client.decompose([e.condition for e in exs], [e.item.instruction for e in exs]),
            ask, self.skips, "decomposition") if ask else ([], [])
        answers = {id(ex): r for ex, r in zip(asked, results)}
        kept = []
        for ex in examples:
            if ex in ask and id(ex) not in answers:
                continue  # refused and counted
            ex.enhanced = ex.item.enhanced
            if id(ex) in answers:
                r = answers[id(ex)]
                self.stats["decomposed"] += 1
                self.stats["decomposer_fallbacks"] += bool(r["fallback"])
                ex.enhanced = _complete(r)
                self.stats["decomposer_partial"] += ex.enhanced is None and not r["fallback"]
                answer = r["answer"].strip() if not r["fallback"] else ""
            else:
                answer = ex.enhanced.answer if ex.enhanced is not None else ""
            ex.prompt = answer if (self.opts.use_enhanced and answer) else ex.item.instruction
            kept.append(ex)
        return kept

    def _encode(self, examples: list[Example]) -> list:
        """Per example: (prompt rows [L, D], negative rows [L', D] or None)."""
        neg = self.opts.negative_prompt
        images = [e.condition for e in examples] * (1 if neg is None else 2)
        prompts = [e.prompt for e in examples] + ([] if neg is None else [neg] * len(examples))
        embeds, mask = self.client.encode(images, prompts)
        rows = [e[:n] for e, n in zip(embeds, mask.sum(1))]
        n = len(examples)
        return [(rows[i], None if neg is None else rows[n + i]) for i in range(n)]

    def records(self, examples: list[Example]) -> list[CacheRecord]:
        examples = self.choose_prompts(examples)
        if not examples:
            return []
        # Padded to a full batch so each bucket compiles once; dispatched before the sidecar call (async), so
        # the VAE runs while the encoder does.
        pixels = np.stack([e.pixels for e in examples])
        pad = self.opts.encode_batch - len(examples)
        pixels = np.concatenate([pixels, pixels[-1:].repeat(pad, 0)])
        latents = source_latents(self.vae_cfg, self.vae_params, pixels)
        encoded, examples = _per_item(self._encode, examples, self.skips, "condition encoding")
        latents = np.asarray(latents)
        out = []
        for ex, (embeds, negative), lat in zip(examples, encoded, latents):
            arrays = {"latents": lat, "prompt_embeds": embeds, "negative_embeds": negative}
            bad = [k for k, a in arrays.items()
                   if a is not None and not np.isfinite(np.asarray(a, np.float32)).all()]
            if bad:
                self.skips.add(DataError(ex.item.source, "non_finite",
                                         f"item {ex.item.id!r}: non-finite {bad}"))
                continue
            out.append(CacheRecord(
                id=ex.item.id, bucket=ex.pixels.shape[:2], latents=lat, source=ex.pixels,
                prompt_embeds=embeds, negative_embeds=negative, instruction=ex.item.instruction,
                prompt=ex.prompt, enhanced=None if ex.enhanced is None else dataclasses.asdict(ex.enhanced)))
        return out


def _write_enhanced_manifest(path: Path, items: list[ManifestItem], reader: CacheReader) -> int:
    """The input manifest with the enhanced parts the cache holds filled in (items the decomposer did)."""
    out = []
    for item in items:
        if item.enhanced is None and item.id in reader:
            parts = reader.texts(item.id)["enhanced"]
            item = dataclasses.replace(item, enhanced=Enhanced(**parts) if parts else None)
        out.append(item)
    return write_manifest(path, out)


def prepare(opts: PrepareOptions, *, progress: bool = True) -> dict:
    """Runs the whole preparation (resuming a partial cache) and returns the report it also writes."""
    start = time.monotonic()
    cache_dir = Path(opts.cache_dir)
    items, skips = read_manifest(opts.manifest)
    vae = load_vae(opts.vae)
    with CacheWriter(cache_dir, opts.settings(), opts.shard_size) as writer, \
            SidecarClient(opts.sidecar) as client:
        served = client.health().get("endpoints", [])
        missing = [e for e in ["encode"] + ["decompose"] * opts.decompose if e not in served]
        if missing:
            raise ValueError(f"the sidecar ({client.url}) does not serve {missing}; start it with --encoder "
                             "(and --decomposer for data.decompose): config sidecar.encoder / .decomposer")
        before = len(writer.done & {it.id for it in items})
        pending = [it for it in items if it.id not in writer.done]
        decoded = grain.MapDataset.source(pending).map(functools.partial(decode_example, opts=opts))
        decoded = decoded.to_iter_dataset(grain.ReadOptions(num_threads=opts.num_threads,
                                                            prefetch_buffer_size=2 * opts.encode_batch))
        preparer = Preparer(opts, client, vae, skips)
        with tqdm(total=len(pending), desc="prepare", unit="item", disable=not progress) as bar:
            for batch in _bucket_batches(decoded, opts.encode_batch, skips, bar):
                for record in preparer.records(batch):
                    writer.add(record)
                bar.update(len(batch))
    reader = CacheReader(cache_dir)
    report = {"manifest": opts.manifest, "cache_dir": str(cache_dir), "items": len(items),
              "already_cached": before, "written": sum(it.id in reader for it in pending),
              "cached": sum(it.id in reader for it in items), **dict(preparer.stats),
              "skipped": skips.total, "skipped_by_kind": dict(skips.counts), "skip_messages": skips.messages,
              "seconds": round(time.monotonic() - start, 2)}
    if opts.decompose:
        path = Path(opts.enhanced_manifest or cache_dir / "manifest.enhanced.jsonl")
        _write_enhanced_manifest(path, items, reader)
        report["enhanced_manifest"] = str(path)
    if skips.total:
        print(skips.summary(), file=sys.stderr)
    report_path = Path(opts.report or cache_dir / "prepare_report.json")
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    report["report"] = str(report_path)
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file (path.py or path.py:ARG)")
    parser.add_argument("--no-progress", action="store_true")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --config.data.decompose=True")
    config = load_config(args.config, [a[len("--config."):] for a in rest])
    report = prepare(PrepareOptions.from_config(config), progress=not args.no_progress)
    print(f"prepared {report['written']} items ({report['already_cached']} were already cached, "
          f"{report['cached']} of {report['items']} now in {report['cache_dir']}); "
          f"report: {report['report']}",
          file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
