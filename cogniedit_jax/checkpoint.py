"""Training checkpoints with orbax: one step folder per save holding `arrays` (a pytree of jax.Arrays: the
trainable params, the optimizer state, the RNG key data) and `meta` (JSON: the data-loader state, counters).

Orbax writes each step into a temporary folder and renames it when complete, so a run killed mid-save leaves
the previous checkpoints intact and no half-written one is ever restored; only the last `keep` are kept.
Restoring takes abstract targets (`jax.ShapeDtypeStruct`s carrying shardings): each array comes back directly
in the layout of the current mesh, whatever mesh wrote it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("arrays", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays, meta: dict) -> None:
        if step in self.manager.all_steps():
            return  # already saved (e.g. the periodic save fell on the final step)
        self.manager.save(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_arrays) -> tuple[object, dict]:
        """(arrays laid out as `abstract_arrays`' shardings, meta) of `step`."""
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(abstract_arrays), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not fit this run's config (the "
                f"model, LoRA, focus or optimizer settings changed since it was written): {e}"
            ) from e
        return out["arrays"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
