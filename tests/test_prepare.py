"""`python -m cogniedit_jax.prepare` and its cache.

The cache alone (fast, no models): round trip, text padding, crash and resume, index rebuilt from the shards,
settings that do not match, a second writer, damaged shards. End to end: a tiny manifest (good images, a
truncated one, a malformed line, one item with enhanced parts), a tiny random diffusers VAE converted by the
CLI, the tiny Qwen2.5-VL sidecar serving encoder and decomposer; records are checked against `vae_encode` of
the resized image and the sidecar's own `encode`, then a rerun must skip everything done.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.data.buckets import edit_dimensions, resize_to
from cogniedit_jax.data.cache import INDEX_NAME, CacheReader, CacheRecord, CacheWriter, cache_loader
from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"vae": "/vae", "negative_prompt": " "}


def record(i: int, bucket=(16, 32), text_length=5, dtype=np.float32, negative=True) -> CacheRecord:
    rng = np.random.default_rng(i)
    h, w = bucket
    return CacheRecord(
        id=f"item:{i}", bucket=bucket, latents=rng.normal(size=(h * w // 256, 16)).astype(dtype),
        source=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        prompt_embeds=rng.normal(size=(text_length, 8)).astype(dtype),
        negative_embeds=rng.normal(size=(3, 8)).astype(dtype) if negative else None,
        instruction=f"make it {i} times redder", prompt=f"paint the object red, {i} times",
        enhanced=None if i % 2 else {"info": "i", "think": "t", "answer": "paint it", "object": "o"})


def write(cache, records, shard_size=2, settings=SETTINGS):
    with CacheWriter(cache, settings, shard_size) as w:
        for r in records:
            w.add(r)


# --- the cache ---------------------------------------------------------------------------------------------


def test_cache_round_trip_pads_text_and_keeps_dtypes(tmp_path):
    records = [record(0, text_length=4), record(1, (32, 16), 7),
               record(2, dtype=ml_dtypes.bfloat16, text_length=2)]
    write(tmp_path, records)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-000000.safetensors", "shard-000001.safetensors"]
    reader = CacheReader(tmp_path)
    assert reader.ids == [r.id for r in records] and reader.buckets == [(16, 32), (32, 16), (16, 32)]
    assert reader.text_length == 7  # the longest prompt or negative prompt
    for r in records:
        got = reader.read(r.id)
        np.testing.assert_array_equal(got["latents"], r.latents)
        np.testing.assert_array_equal(got["source"], r.source)
        assert got["latents"].dtype == r.latents.dtype and got["prompt_embeds"].dtype == r.prompt_embeds.dtype
        n = len(r.prompt_embeds)
        np.testing.assert_array_equal(got["prompt_embeds"][:n], r.prompt_embeds)
        assert not got["prompt_embeds"][n:].any() and got["prompt_embeds"].shape == (7, 8)
        assert got["prompt_mask"].tolist() == [1] * n + [0] * (7 - n)
        np.testing.assert_array_equal(got["negative_embeds"][:3], r.negative_embeds)
        assert got["negative_mask"].sum() == 3
        assert (got["bucket"], got["instruction"], got["prompt"], got["enhanced"]) == (
            r.bucket, r.instruction, r.prompt, r.enhanced)
    assert CacheReader(tmp_path, text_length=10).read("item:0")["prompt_embeds"].shape == (10, 8)
    with pytest.raises(ValueError, match=r"text_length=6 is shorter than the longest prompt .* \(7 tokens\)"):
        CacheReader(tmp_path, text_length=6)
    with pytest.raises(KeyError, match="'nope' is not in the cache"):
        reader.read("nope")


def test_cache_resumes_after_a_crash_and_rebuilds_its_index(tmp_path):
    w = CacheWriter(tmp_path, SETTINGS, shard_size=2)
    for i in range(5):
        w.add(record(i))
    w._lock.close()  # the process dies: the fifth record was never committed
    (tmp_path / "shard-000009.safetensors.tmp").write_bytes(b"half a shard")
    with CacheWriter(tmp_path, SETTINGS, shard_size=2) as w:
        assert w.done == {f"item:{i}" for i in range(4)}
        assert not list(tmp_path.glob("*.tmp"))
        w.add(record(4))
    assert len(CacheReader(tmp_path)) == 5
    # A crash between a shard's rename and the index update (here: the index is gone) loses nothing.
    (tmp_path / INDEX_NAME).unlink()
    with CacheWriter(tmp_path, SETTINGS) as w:
        assert w.done == {f"item:{i}" for i in range(5)}
    reader = CacheReader(tmp_path)
    np.testing.assert_array_equal(reader.read("item:3")["latents"], record(3).latents)
    with pytest.raises(ValueError, match="already in"):
        write(tmp_path, [record(3)])


def test_cache_refuses_other_settings_and_a_second_writer(tmp_path):
    write(tmp_path, [record(0)])
    with pytest.raises(ValueError, match=r"other settings \(saved vs now: negative_prompt: ' ' vs None\)"):
        CacheWriter(tmp_path, {**SETTINGS, "negative_prompt": None})
    with CacheWriter(tmp_path, SETTINGS), pytest.raises(RuntimeError, match="another process is writing"):
        CacheWriter(tmp_path, SETTINGS)
    with pytest.raises(ValueError, match=r"source must be uint8 \[16, 16, 3\] \(its bucket\), found"):
        write(tmp_path / "b", [CacheRecord(**{**record(1).__dict__, "bucket": (16, 16)})])


def test_damaged_shards_raise_data_errors_naming_the_file(tmp_path):
    write(tmp_path, [record(i) for i in range(4)])
    shard = tmp_path / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last array of row 1
    shard.write_bytes(bytes(data))
    reader = CacheReader(tmp_path)
    reader.read("item:2")  # the other row of the shard is intact
    with pytest.raises(DataError, match=f"{shard}: record 'item:3' \\(row 1\\): array '.*' fails its CRC-32"):
        reader.read("item:3")
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DataError, match=f"{shard}: cache shard is unreadable") as err:
        CacheReader(tmp_path).read("item:2")
    assert err.value.kind == "corrupt_cache"
    (tmp_path / "shard-000000.safetensors").unlink()
    with pytest.raises(DataError, match="shard-000000.safetensors: cache shard is missing"):
        CacheReader(tmp_path).read("item:0")
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(DataError, match=f"{tmp_path / INDEX_NAME}: cache index is unreadable"):
        CacheReader(tmp_path)


def test_cache_loader_masks_damaged_records(tmp_path):
    write(tmp_path, [record(i) for i in range(4)], shard_size=1)
    (tmp_path / "shard-000002.safetensors").write_bytes(b"garbage")
    loader = cache_loader(tmp_path, global_batch_size=4, seed=0, num_epochs=1, num_threads=1)
    (batch,) = list(loader)
    assert batch["valid"].sum() == 3 and loader.skips.counts == {"corrupt_cache": 1}
    assert batch["latents"].shape == (4, 2, 16) and batch["prompt_mask"].shape == (4, 5)
    assert sorted(i for i, v in zip(batch["id"], batch["valid"]) if v) == ["item:0", "item:1", "item:3"]


# --- prepare end to end ------------------------------------------------------------------------------------

AREA = 128 * 128
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1])


def _convert_cli():
    """convert/qwen_image_edit.py as a module: its `main(argv)` in this process (a subprocess would import
    torch and JAX again)."""
    spec = importlib.util.spec_from_file_location("convert_qie", ROOT / "convert" / "qwen_image_edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(converted tiny VAE folder, a client of a running tiny sidecar serving encoder and decomposer). The
    sidecar is written and started in a thread while the VAE is built."""
    from cogniedit_jax.bench.vae import random_diffusers_vae
    from cogniedit_jax.sidecar.client import SidecarClient
    from cogniedit_jax.sidecar.tiny import write_tiny_checkpoint

    def start_sidecar():
        # Small processor bounds: the ~1 MP condition image becomes a few patches (the pixels are still the
        # pipeline's; only the tiny model sees fewer of them).
        tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vl"), max_pixels=12544)
        log_file = tmp_path_factory.mktemp("logs") / "sidecar.log"
        client = SidecarClient({"spawn": True, "encoder": str(tiny), "decomposer": str(tiny), "device": "cpu",
                                "timeout_s": 120, "log_file": str(log_file),
                                "extra_args": ["--decomposer-max-new-tokens", "8"]})
        client.start()
        return client

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(start_sidecar)
        src, out = tmp_path_factory.mktemp("vae-diffusers"), tmp_path_factory.mktemp("vae-converted")
        random_diffusers_vae(seed=1, **TINY_VAE).save_pretrained(src)
        assert _convert_cli()(["--no-progress", "--vae", str(src), "--out", str(out)]) == 0
        client = started.result()
    try:
        yield out, client
    finally:
        client.close()


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, size, seed in [("a", (64, 48), 0), ("b", (64, 48), 1), ("c", (48, 64), 2), ("d", (48, 64), 3)]:
        _image(root / f"{name}.png", size, seed)
    _image(root / "bad.png", (64, 48), 4)
    (root / "bad.png").write_bytes((root / "bad.png").read_bytes()[:300])  # truncated
    enhanced = {"info": "a noisy square", "think": "it should be red", "answer": "Tint the whole square red.",
                "object": "the square"}
    lines = [{"id": "a", "source": "a.png", "instruction": "make the sky orange"},
             {"id": "bad", "source": "bad.png", "instruction": "make it blue"},
             {"id": "b", "source": "b.png", "instruction": "add a small red hat"},
             {"id": "c", "source": "c.png", "instruction": "remove the car"},
             {"id": "d", "source": "d.png", "instruction": "make it red", "enhanced": enhanced}]
    rows = [json.dumps(x) for x in lines]
    (root / "train.jsonl").write_text("\n".join(rows[:2] + ["{broken"] + rows[2:]) + "\n")
    return root


@pytest.fixture(scope="module")
def config_file(data, models):
    vae_dir, sidecar = models
    path = data / "prepare_config.py"
    path.write_text(f'''import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.data = dict(manifest={str(data / "train.jsonl")!r}, cache_dir={str(data / "cache")!r},
                  negative_prompt=True, target_area={AREA}, num_threads=2, decompose=True, use_enhanced=True,
                  encode_batch=3, shard_size=2)
    c.model = dict(path={str(vae_dir)!r})
    c.sidecar = dict(url={sidecar.url!r}, timeout_s=120.0)
    return c
''')
    return path


@pytest.fixture(scope="module")
def first_run(config_file):
    from cogniedit_jax.prepare import main

    return main(["--config", str(config_file), "--no-progress"])


def test_prepare_writes_the_cache_and_reports_bad_items(first_run, data, models):
    from cogniedit_jax.models import load_vae, vae_encode
    from cogniedit_jax.models.vae import normalize_latents
    from cogniedit_jax.sampling.edit_loop import pack_latents

    vae_dir, sidecar = models
    report = first_run
    assert (report["items"], report["already_cached"], report["written"], report["cached"]) == (5, 0, 4, 4)
    assert report["skipped_by_kind"] == {"bad_line": 1, "truncated": 1}
    assert any(m.startswith(f"{data / 'train.jsonl'}:3: malformed JSON") for m in report["skip_messages"])
    assert any(m.startswith(f"{data / 'bad.png'}:") for m in report["skip_messages"])
    assert json.loads(Path(report["report"]).read_text())["written"] == 4
    assert report["decomposed"] == 3  # a, b, c; d has its parts in the manifest

    reader = CacheReader(data / "cache")
    assert sorted(reader.ids) == ["a", "b", "c", "d"] and "bad" not in reader
    vae_cfg, vae_params = load_vae(vae_dir)
    for item_id in reader.ids:
        rec = reader.read(item_id)
        img = Image.open(data / f"{item_id}.png").convert("RGB")
        w, h = edit_dimensions(img.width, img.height, AREA)
        assert rec["bucket"] == (h, w) and rec["source"].shape == (h, w, 3)
        pixels = np.asarray(resize_to(img, w, h))
        np.testing.assert_array_equal(rec["source"], pixels)
        x = jnp.asarray((pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None])
        expected = pack_latents(normalize_latents(vae_cfg, vae_encode(vae_cfg, vae_params, x)))[0]
        assert rec["latents"].shape == (h // 16 * (w // 16), 16)
        # Batched (2 rows, one padded) against one row: XLA may sum in another order.
        assert relative_error(rec["latents"], expected) <= 1e-5

        # The condition is the sidecar's own encoding of the original image and the recorded prompt.
        embeds, mask = sidecar.encode([np.asarray(img), np.asarray(img)], [rec["prompt"], " "])
        for name, row in (("prompt", 0), ("negative", 1)):
            n = int(mask[row].sum())
            assert rec[f"{name}_mask"].sum() == n
            assert relative_error(rec[f"{name}_embeds"][:n], embeds[row, :n]) <= 1e-5
    d = reader.read("d")
    assert d["prompt"] == "Tint the whole square red." and d["enhanced"]["object"] == "the square"
    # The random decomposer rarely writes an <answer>: then the instruction is kept, and counted.
    kept = sum(reader.read(i)["prompt"] == reader.read(i)["instruction"] for i in "abc")
    assert kept == report.get("decomposer_fallbacks", 0)
    enhanced, skips = read_manifest(report["enhanced_manifest"])
    assert [it.id for it in enhanced] == ["a", "bad", "b", "c", "d"] and not skips.total
    assert enhanced[-1].enhanced.answer == "Tint the whole square red."


def test_rerun_skips_done_items_and_refuses_other_settings(first_run, config_file, data):
    from cogniedit_jax.prepare import main

    shards = {p: p.stat().st_mtime_ns for p in (data / "cache").glob("shard-*")}
    report = main(["--config", str(config_file), "--no-progress"])
    assert (report["already_cached"], report["written"], report["cached"]) == (4, 0, 4)
    assert report["skipped_by_kind"] == {"bad_line": 1, "truncated": 1}  # tried again, still bad
    assert {p: p.stat().st_mtime_ns for p in (data / "cache").glob("shard-*")} == shards
    with pytest.raises(ValueError, match="negative_prompt: ' ' vs None"):
        main(["--config", str(config_file), "--no-progress", "--config.data.negative_prompt=False"])


def test_a_refused_item_is_skipped_alone():
    from cogniedit_jax.data.errors import SkipLog
    from cogniedit_jax.data.manifest import ManifestItem
    from cogniedit_jax.prepare import Example, _per_item
    from cogniedit_jax.sidecar.client import SidecarRequestError

    pixels = np.zeros((32, 32, 3), np.uint8)
    items = [ManifestItem(f"i{k}", f"/data/{k}.png", "make it red") for k in range(4)]
    examples = [Example(item, pixels, pixels) for item in items]
    calls = []

    def encode(exs, status=413):
        calls.append(len(exs))
        if any(e.item.id == "i2" for e in exs):
            raise SidecarRequestError(f"/encode answered {status}: items[0].image: too large", status)
        return [e.item.id for e in exs]

    skips = SkipLog()
    results, kept = _per_item(encode, examples, skips, "condition encoding")
    assert results == ["i0", "i1", "i3"] and [e.item.id for e in kept] == results and calls == [4, 1, 1, 1, 1]
    assert skips.counts == {"sidecar": 1}
    assert skips.messages[0] == ("/data/2.png: condition encoding of item 'i2' refused: "
                                 "/encode answered 413: items[0].image: too large")
    with pytest.raises(SidecarRequestError, match="404"):  # a missing endpoint stops the run
        _per_item(lambda exs: encode(exs, 404), examples, skips, "condition encoding")
