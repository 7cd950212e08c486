"""diffusers `QwenImageTransformer2DModel` folder -> our converted folder, one tensor at a time.

Peak host memory is about one source tensor (and its cast and transposed copies): each tensor is read
from its shard, renamed, cast, transposed, and written at its final offset in the output file, where
the stacked block parameters are laid out layer after layer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from cogniedit_jax.models import param_mapping
from cogniedit_jax.models.config import DTYPES, MMDiTConfig
from cogniedit_jax.models.loading import CONFIG_NAME, PARAMS_NAME, check_tensors

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_SAFETENSORS_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


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
        # As bytes: the buffer protocol has no bf16.
        self.file.write(np.ascontiguousarray(array).view(np.uint8).data)
        self.written.add((name, layer))

    def close(self) -> None:
        self.file.close()

    def unwritten(self) -> list[str]:
        """Tensors never written, and the missing layers of those written layer by layer: a bug in the
        caller's plan if not empty."""
        layers = collections.defaultdict(set)
        for name, layer in self.written:
            layers[name].add(layer)
        missing = []
        for name, (shape, _) in self.layout.items():
            if not layers[name]:
                missing.append(name)
            elif None not in layers[name]:
                missing += [f"{name}[{i}]" for i in range(shape[0]) if i not in layers[name]]
        return missing


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", ...


def source_tensors(src: Path) -> dict[str, SourceTensor]:
    """Every tensor of a single-file or sharded (+ index) diffusers model folder, from the files' headers."""
    files, weight_map = _source_files(src)
    found, problems = {}, []
    for file in files:
        with safe_open(file, "numpy") as f:
            for k in f.keys():
                if k in found:
                    problems.append(f"{k} is in both {found[k].file.name} and {file.name}")
                view = f.get_slice(k)
                found[k] = SourceTensor(file, tuple(view.get_shape()), view.get_dtype())
    if weight_map is not None:
        # The converter reads what the shards hold; an index that disagrees is corrupt or belongs elsewhere.
        located = {k: s.file.relative_to(src).as_posix() for k, s in found.items()}
        problems += [f"{k}: index says {weight_map.get(k)}, found in {located.get(k)}"
                     for k in sorted(set(weight_map) | set(found)) if weight_map.get(k) != located.get(k)]
    if problems:
        raise ValueError(f"{src}: the shards disagree with their index\n  " + "\n  ".join(problems))
    return found


def _source_files(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """-> (the safetensors files, the index's weight map or None for a single file)."""
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{src}: several shard indexes {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shard files that are not there: {missing}")
        return sorted({src / f for f in weight_map.values()}), weight_map
    files = sorted(src.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{src}: expected one .safetensors file or a *.safetensors.index.json, "
                                f"found {[p.name for p in files]}")
    return files, None


def output_dtype(dtype: str | None, sources: dict[str, SourceTensor]) -> np.dtype:
    """The requested dtype, or the checkpoint's (its most common one); one the model can run in."""
    if dtype is None:
        counts = collections.Counter(s.dtype for s in sources.values())
        source_dtype = counts.most_common(1)[0][0]
        if source_dtype not in _NUMPY_DTYPES:
            raise ValueError(f"checkpoint dtype {source_dtype} has no converted equivalent: pass dtype=")
        dtype = np.dtype(_NUMPY_DTYPES[source_dtype]).name
    if dtype not in DTYPES:
        raise ValueError(f"output dtype {dtype!r}: the model runs in one of {DTYPES}; pass one of them")
    return np.dtype(dtype)


def _read(source: SourceTensor, key: str) -> np.ndarray:
    # A fresh mapping per tensor: a shard kept open keeps every page read from it resident (RssFile), so
    # peak RSS would grow by a whole shard (~5 GB for the real model) though each tensor is read once.
    with safe_open(source.file, "numpy") as f:
        return f.get_tensor(key)


def convert_transformer(src, dst, dtype: str | None = None, progress: bool = True) -> MMDiTConfig:
    """Convert the diffusers transformer folder `src` into `dst/transformer/`.

    dtype: None keeps the checkpoint's."""
    src, out = Path(src), Path(dst) / "transformer"
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --transformer takes a diffusers transformer "
                                "folder")
    sources = source_tensors(src)
    out_dtype = output_dtype(dtype, sources)
    cfg = MMDiTConfig.from_diffusers(json.loads(config_file.read_text()), dtype=out_dtype.name)
    plan = param_mapping.tensors(cfg)
    # (their key) -> (our tensor, layer)
    targets = {key: (t, i if t.stacked else None)
               for t in plan for i, key in enumerate(t.their_keys(cfg.num_layers))}
    check_tensors({k: t.their_shape() for k, (t, _) in targets.items()},
                  {k: s.shape for k, s in sources.items()}, str(src))

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PARAMS_NAME + ".partial")
    try:
        _write_params(tmp, plan, sources, targets, out_dtype, str(src), progress)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file as big as the model is worth nothing
        raise
    os.replace(tmp, out / PARAMS_NAME)
    cfg.to_json(out / CONFIG_NAME)
    return cfg


def _write_params(path: Path, plan, sources, targets, out_dtype: np.dtype, source_name: str, progress: bool):
    writer = SafetensorsStreamWriter(path, {t.ours: (t.shape, out_dtype) for t in plan},
                                     metadata={"format": "cogniedit_jax", "source": source_name})
    try:
        bar = tqdm(sources.items(), desc="convert transformer", unit="tensor", disable=not progress)
        for key, source in bar:
            t, layer = targets[key]
            array = _read(source, key).astype(out_dtype, copy=False)
            writer.write(t.ours, array.T if t.transpose else array, layer)
    finally:
        writer.close()
    if writer.unwritten():
        raise RuntimeError(f"conversion left tensors unwritten: {writer.unwritten()}")
