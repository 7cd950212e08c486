"""The converter's peak host memory against the size of the model it converts.

    python -m cogniedit_jax.bench.conversion_memory [--layers 4] [--shard-size 200MB]

Builds a random ~1.3 GB fp32 diffusers `QwenImageTransformer2DModel` (24 heads x 64, 4 layers), saves
it sharded, converts it in a fresh subprocess (fp32 and bf16 output) and loads the fp32 result on CPU.
The conversion is meant to hold about one tensor at a time, so its peak RSS should be the interpreter's
(numpy, jax, safetensors imported) plus a few of the largest tensor, not the model's size.

Peak RSS (VmHWM) includes the pages of memory-mapped files while they stay mapped (RssFile: page cache,
reclaimable, but counted against the process and its cgroup) besides the process's own memory (RssAnon),
so the peaks of both are polled and reported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_IMPORT_ONLY = "import cogniedit_jax.models.conversion"
_CONVERT = ("import sys; from cogniedit_jax.models.conversion import convert_transformer; "
            "convert_transformer(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)")
_LOAD = "import sys; from cogniedit_jax.models import load_transformer; load_transformer(sys.argv[1])"
_REPORT_PEAK = "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"


def build_model(path: Path, layers: int, shard_size: str) -> tuple[int, int]:
    """Save a random model to `path`; -> (bytes of weights, bytes of its largest tensor)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=layers, attention_head_dim=64, num_attention_heads=24,
                                        joint_attention_dim=1024, axes_dims_rope=(8, 28, 28))
    model.save_pretrained(path, max_shard_size=shard_size)
    sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
    return sum(sizes), max(sizes)


def _poll_rss(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    """Peak RssAnon / RssFile (kB) of `pid`, from /proc, until `done` is set or the process is gone."""
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                peaks[name] = max(peaks.get(name, 0), int(value.split()[0]))
        time.sleep(0.005)


def measure(code: str, *args: str) -> dict[str, int]:
    """Run `python -c code args` -> peak bytes: VmHWM (the child's peak RSS, which it prints as it exits)
    and the polled RssAnon / RssFile peaks.

    Not getrusage: Linux folds the forked copy of this (torch-importing) parent into the child's ru_maxrss.
    """
    proc = subprocess.Popen([sys.executable, "-c", code + _REPORT_PEAK, *args], stdout=subprocess.PIPE,
                            text=True)
    peaks, done = {}, threading.Event()
    poller = threading.Thread(target=_poll_rss, args=(proc.pid, peaks, done))
    poller.start()
    stdout, _ = proc.communicate()
    done.set()
    poller.join()
    if proc.returncode:
        raise RuntimeError(f"{[sys.executable, '-c', code, *args]} exited with {proc.returncode}")
    peak = int(stdout.split("VmHWM:")[1].split()[0])
    return {"VmHWM": peak * 1024, **{k: v * 1024 for k, v in peaks.items()}}


def _mb(n: int) -> str:
    return f"{n / 2**20:8.1f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-size", default="200MB", help="save_pretrained's max_shard_size")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "diffusers"
        model_bytes, largest = build_model(src, args.layers, args.shard_size)
        shards = sorted(src.glob("*.safetensors"))
        print(f"model: {_mb(model_bytes)} fp32 in {len(shards)} shards "
              f"(largest shard {_mb(max(p.stat().st_size for p in shards))}, largest tensor {_mb(largest)})")
        baseline = measure(_IMPORT_ONLY)
        rows = [("import only", baseline)]
        for dtype in ("float32", "bfloat16"):
            rows.append((f"convert -> {dtype}", measure(_CONVERT, str(src), str(Path(tmp) / dtype), dtype)))
        # Loading holds the whole model by design; what matters is that the file is not resident on top.
        rows.append(("load float32 (CPU)", measure(_LOAD, str(Path(tmp) / "float32"))))
        print(f"{'run':<26}{'peak RSS':>12}{'RssAnon':>12}{'RssFile':>12}{'RSS/model':>11}")
        for name, m in rows:
            print(f"{name:<26}{_mb(m['VmHWM']):>12}{_mb(m.get('RssAnon', 0)):>12}"
                  f"{_mb(m.get('RssFile', 0)):>12}{m['VmHWM'] / model_bytes:>11.3f}")
        for name, m in rows[1:3]:
            print(f"{name}: peak RSS above import-only = {_mb(m['VmHWM'] - baseline['VmHWM'])} "
                  f"= {(m['VmHWM'] - baseline['VmHWM']) / largest:.1f} x the largest tensor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
