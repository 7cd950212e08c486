"""diffusers `QwenImageTransformer2DModel` folder -> our converted folder, one tensor at a time.

Peak host memory is one source tensor (and its transposed copy): each tensor is read from its
memory-mapped shard, renamed, cast, transposed, and written at its final offset in the output file,
where the stacked block parameters are laid out layer after layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from cogniedit_jax.models import param_mapping
from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.models.loading import CONFIG_NAME, PARAMS_NAME, check_tensors

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(ml_dtypes.bfloat16): "BF16"}


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensors arrive piecewise (one stacked layer at a time), in any order.

    The safetensors library only writes from a complete in-memory dict, which for a 40 GB model means
    holding it all; the format (u64 header size, JSON header, contiguous little-endian data) is simple
    enough to lay out up front and fill by offset. Every byte must be written exactly once.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], np.dtype]], metadata=None):
        self.path = Path(path)
        self.layout = layout
        header, offset, self.offsets = {}, 0, {}
        for name, (shape, dtype) in layout.items():
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.written: set[tuple[str, int | None]] = set()
        self.file = open(self.path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, array: np.ndarray, layer: int | None = None) -> None:
        """Write the whole tensor `name`, or its slice `layer` along the leading (stacked) axis."""
        shape, dtype = self.layout[name]
        expected = shape if layer is None else shape[1:]
        if array.shape != tuple(expected) or array.dtype != dtype:
            raise ValueError(f"{name}[{layer}]: got {array.shape} {array.dtype}, expected {expected} {dtype}")
        offset = self.offsets[name] + (0 if layer is None else layer * array.nbytes)
        self.file.seek(self.data_start + offset)
        self.file.write(np.ascontiguousarray(array).data)
        self.written.add((name, layer))

    def close(self) -> None:
        self.file.close()

    def unwritten(self) -> list[str]:
        """Tensors (or layers of them) never written: a bug in the caller's plan if not empty."""
        return [f"{name}[{i}]" if i is not None else name for name, (shape, _) in self.layout.items()
                for i in ([None] if (name, None) in self.written else range(shape[0]))
                if (name, i) not in self.written]


def source_index(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or sharded (+ index) diffusers model folder."""
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{src}: several shard indexes {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shard files that are not there: {missing}")
        return {k: src / f for k, f in weight_map.items()}
    files = sorted(src.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{src}: expected one .safetensors file or a *.safetensors.index.json, "
                                f"found {[p.name for p in files]}")
    with safe_open(files[0], "numpy") as f:
        return {k: files[0] for k in f.keys()}


def convert_transformer(src, dst, dtype: str | None = None, progress: bool = True) -> MMDiTConfig:
    """Convert the diffusers transformer folder `src` into `dst/transformer/`. dtype: None keeps the source's."""
    src, out = Path(src), Path(dst) / "transformer"
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --transformer takes a diffusers transformer folder")
    index = source_index(src)
    shapes, dtypes = {}, {}
    for file in sorted(set(index.values())):
        with safe_open(file, "numpy") as f:
            for k in f.keys():
                view = f.get_slice(k)
                shapes[k] = tuple(view.get_shape())
                dtypes[k] = view.get_dtype()
    plan = param_mapping.tensors(MMDiTConfig.from_diffusers(json.loads(config_file.read_text())))
    source_dtype = max(set(dtypes.values()), key=list(dtypes.values()).count)
    out_dtype = np.dtype(dtype) if dtype else np.dtype({"F32": np.float32, "F16": np.float16,
                                                        "BF16": ml_dtypes.bfloat16}[source_dtype])
    cfg = MMDiTConfig.from_diffusers(json.loads(config_file.read_text()), dtype=np.dtype(out_dtype).name)
    # (their key) -> (our tensor, layer)
    targets = {key: (t, i if t.stacked else None) for t in plan for i, key in enumerate(t.their_keys(cfg.num_layers))}
    check_tensors({k: t.their_shape() for k, (t, _) in targets.items()}, shapes, str(src))

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PARAMS_NAME + ".partial")
    writer = SafetensorsStreamWriter(tmp, {t.ours: (t.shape, out_dtype) for t in plan},
                                     metadata={"format": "cogniedit_jax", "source": str(src)})
    try:
        with tqdm(total=len(targets), desc="convert transformer", unit="tensor", disable=not progress) as bar:
            for file in sorted(set(index.values())):
                with safe_open(file, "numpy") as f:
                    for key in (k for k, v in index.items() if v == file):
                        t, layer = targets[key]
                        array = f.get_tensor(key).astype(out_dtype, copy=False)
                        writer.write(t.ours, array.T if t.transpose else array, layer)
                        bar.update()
    finally:
        writer.close()
    if writer.unwritten():
        raise RuntimeError(f"conversion left tensors unwritten: {writer.unwritten()}")
    os.replace(tmp, out / PARAMS_NAME)
    cfg.to_json(out / CONFIG_NAME)
    return cfg
