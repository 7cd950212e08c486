"""The training loader: deterministic for a seed, reshuffled every epoch, batches of one resolution bucket,
host prefetch threads, one slice of every global batch per host, and a small state that resumes exactly.

The batch order is a pure function of (seed, epoch, the items' buckets, global batch size): `epoch_plan`
permutes the items with a generator seeded by (seed, epoch), cuts each bucket's items (in permuted order) into
global batches, drops each bucket's remainder, and permutes the batches. Global step k is batch k % E of epoch
k // E (E = batches per epoch, the same every epoch), so the state is just (seed, epoch, position):
restoring it and iterating yields exactly the batches an uninterrupted loader yields. Every host computes the
same plan and takes rows [p*b, (p+1)*b) of each global batch (b = global batch / process count): the hosts of
one step always share one bucket, so their rows form one global array, and a run can resume on a different
number of hosts.

grain does the work between plan and batch: `MapDataset.range(step, ...)` of global steps, `.map` loading a
step's rows (a bad item is counted and its row masked out, never fatal), and `to_iter_dataset` with
`ReadOptions` for the ordered prefetch threads (PIL decoding and resizing release the GIL). The state counts
the batches handed to the caller, not those prefetched, so threads reading ahead never shift a resume.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence

import grain
import numpy as np

from cogniedit_jax.data.buckets import TARGET_AREA, edit_dimensions, resize_to
from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS, load_rgb, probe_size
from cogniedit_jax.data.manifest import ManifestItem


def epoch_plan(bucket_ids: np.ndarray, global_batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's global batches (arrays of item indices, one bucket each) in the order they are served."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(bucket_ids))
    batches = []
    for b in np.unique(bucket_ids):
        members = perm[bucket_ids[perm] == b]
        for i in range(len(members) // global_batch_size):
            batches.append(members[i * global_batch_size:(i + 1) * global_batch_size])
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[dict]) -> dict:
    """Arrays (and numpy scalars) in every example are stacked on a new leading axis; the rest are lists."""
    out = {}
    for key in examples[0]:
        values = [ex.get(key) for ex in examples]
        stack = all(isinstance(v, (np.ndarray, np.generic)) for v in values)
        out[key] = np.stack(values) if stack else values
    return out


class Loader:
    """Iterate to get batches (dicts from `collate`); `state_dict()` / `load_state_dict()` to checkpoint.

    buckets[i] is item i's bucket key (any hashable, e.g. (height, width)); load_fn(i) returns item i as a
    dict of arrays and other values, or raises DataError. Every batch has the same number of rows and a bool
    array `valid`: a row whose item failed is counted in `skips`, filled with a copy of a loadable item of the
    same bucket and marked invalid, so shapes stay static under jit and all hosts step together (weight the
    loss by `valid`). num_epochs=None: forever.
    """

    def __init__(self, buckets: Sequence[Hashable], load_fn: Callable[[int], dict], *, global_batch_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 num_threads: int = 8, prefetch: int = 8, skips: SkipLog | None = None):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
        keys = {k: i for i, k in enumerate(sorted(set(buckets), key=repr))}
        self.bucket_keys = list(keys)
        self.bucket_ids = np.array([keys[b] for b in buckets], dtype=np.int64)
        counts = np.bincount(self.bucket_ids, minlength=len(keys))
        self.batches_per_epoch = int(sum(c // global_batch_size for c in counts))
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket has global_batch_size={global_batch_size} items; bucket sizes: "
                             f"{dict(zip(self.bucket_keys, counts.tolist()))}")
        self.load_fn = load_fn
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rows = slice(process_index * global_batch_size // process_count,
                          (process_index + 1) * global_batch_size // process_count)
        self.num_epochs = num_epochs
        self.read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self.skips = skips if skips is not None else SkipLog()
        self.step = 0
        self._plan = functools.lru_cache(maxsize=2)(
            functools.partial(epoch_plan, self.bucket_ids, global_batch_size, seed))

    @property
    def unused_per_epoch(self) -> int:
        """Items left out of each epoch (bucket remainders; which ones changes with the epoch)."""
        return len(self.bucket_ids) - self.batches_per_epoch * self.global_batch_size

    def host_indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        return self._plan(epoch)[position][self.rows]

    def _load_step(self, step: int) -> tuple[int, dict, list[DataError]]:
        rows = self.host_indices(step)
        examples, errors = [], []
        for i in rows:
            try:
                examples.append(self.load_fn(int(i)))
            except DataError as err:
                examples.append(None)
                errors.append(err)
        valid = np.array([ex is not None for ex in examples])
        if not valid.all():
            filler = next((ex for ex in examples if ex is not None), None)
            if filler is None:
                filler = self._bucket_filler(rows, errors)
            examples = [filler if ex is None else ex for ex in examples]
        batch = collate(examples)
        batch["valid"] = valid
        return step, batch, errors

    def _bucket_filler(self, rows: np.ndarray, errors: list[DataError]) -> dict:
        """Some loadable item of the rows' bucket, standing in for rows that failed (not counted as seen: its
        `valid` flag is False). Failures met here are not logged: they are when their own turn comes."""
        bucket = self.bucket_ids[rows[0]]
        for j in np.flatnonzero(self.bucket_ids == bucket):
            if j in rows:
                continue
            try:
                return self.load_fn(int(j))
            except DataError:
                continue
        raise RuntimeError(f"every item of bucket {self.bucket_keys[bucket]} failed to load; first error: "
                           f"{errors[0]}")

    def __iter__(self):
        stop = self.num_epochs * self.batches_per_epoch if self.num_epochs is not None else 2**62
        steps = grain.MapDataset.range(self.step, stop).map(self._load_step)
        for step, batch, errors in steps.to_iter_dataset(self.read_options):
            self.step = step + 1
            for err in errors:
                self.skips.add(err)
            yield batch

    def state_dict(self) -> dict:
        """JSON-able. No generator state is kept: every epoch's generator is rebuilt from (seed, epoch)."""
        epoch, position = divmod(self.step, self.batches_per_epoch)
        return {"seed": self.seed, "epoch": epoch, "position": position,
                "batches_per_epoch": self.batches_per_epoch, "global_batch_size": self.global_batch_size,
                "skipped": dict(self.skips.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the next iteration starts with the batch after the last one served."""
        mine = {"seed": self.seed, "batches_per_epoch": self.batches_per_epoch,
                "global_batch_size": self.global_batch_size}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state does not fit this loader (field: saved vs now): "
                             + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
                             + "; the data, seed or batch size changed since it was saved")
        self.step = int(state["epoch"]) * self.batches_per_epoch + int(state["position"])
        self.skips.counts.clear()
        self.skips.counts.update(state.get("skipped", {}))


def _image_array(path: str, width: int, height: int, max_pixels: int) -> np.ndarray:
    return np.asarray(resize_to(load_rgb(path, max_pixels), width, height))


def manifest_loader(items: Sequence[ManifestItem], *, global_batch_size: int, seed: int = 0,
                    max_pixels: int = DEFAULT_MAX_PIXELS, target_area: int = TARGET_AREA,
                    **loader_kwargs) -> Loader:
    """A Loader over manifest items that decodes images: each example has id, instruction, enhanced (or None),
    source uint8 [H, W, 3] at the edit size of its bucket, and target (same size, or None). `target_area` is
    the pipeline's 1024 * 1024; smaller values give the same aspect buckets at a lower resolution (CPU demos).

    Every source header is probed first: missing, unreadable, oversized or extreme-aspect items are left out
    of the plan and counted in the loader's `skips`; damage only found when decoding (a truncated file) masks
    that row out of its batch (`valid`).
    """
    skips = SkipLog()
    kept, buckets = [], []
    for item in items:
        try:
            w, h = probe_size(item.source, max_pixels)
            try:
                size = edit_dimensions(w, h, target_area)
            except ValueError as e:
                raise DataError(item.source, "bad_aspect", str(e))
        except DataError as err:
            skips.add(err)
            continue
        kept.append(item)
        buckets.append((size[1], size[0]))

    def load(i: int) -> dict:
        item, (height, width) = kept[i], buckets[i]
        return {
            "id": item.id,
            "instruction": item.instruction,
            "enhanced": item.enhanced,
            "source": _image_array(item.source, width, height, max_pixels),
            "target": None if item.target is None else _image_array(item.target, width, height, max_pixels),
        }

    return Loader(buckets, load, global_batch_size=global_batch_size, seed=seed, skips=skips, **loader_kwargs)
