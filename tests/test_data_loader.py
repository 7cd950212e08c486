"""The training loader: deterministic plan, one bucket per batch, exact resume from saved state (with prefetch
threads running ahead), per-host slices of the global batch, and bad items counted, named and masked out."""

import json

import numpy as np
import pytest

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.loader import Loader, epoch_plan, manifest_loader
from cogniedit_jax.data.manifest import ManifestItem
from tests.test_data_helpers import save_rgb, truncate

# 3 buckets of 11, 7 and 5 items; with batch 4: 2 + 1 + 1 = 4 batches per epoch, 3 + 3 + 1 = 7 items left out.
BUCKETS = [(64, 32)] * 11 + [(32, 32)] * 7 + [(32, 64)] * 5
rng = np.random.default_rng(0)
BUCKETS = [BUCKETS[i] for i in rng.permutation(len(BUCKETS))]


def _loader(seed=0, **kw):
    kw.setdefault("global_batch_size", 4)
    return Loader(BUCKETS, lambda i: {"index": np.int64(i), "bucket": BUCKETS[i]}, seed=seed, **kw)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch["index"].tolist())
        if len(out) == n:
            break
    return out


def test_plan_is_deterministic_bucketed_and_reshuffled_each_epoch():
    ids = _loader().bucket_ids
    e0, e0_again, e1 = (epoch_plan(ids, 4, 0, 0), epoch_plan(ids, 4, 0, 0), epoch_plan(ids, 4, 0, 1))
    assert [b.tolist() for b in e0] == [b.tolist() for b in e0_again]
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    assert [b.tolist() for b in e0] != [b.tolist() for b in epoch_plan(ids, 4, 1, 0)]
    for plan in (e0, e1):
        assert len(plan) == 4 and all(len(b) == 4 for b in plan)
        assert all(len({BUCKETS[i] for i in b}) == 1 for b in plan)  # one bucket per batch
        flat = np.concatenate(plan)
        assert len(set(flat.tolist())) == len(flat) == 16  # no item twice in an epoch
    loader = _loader(num_epochs=2)
    assert loader.batches_per_epoch == 4 and loader.unused_per_epoch == 7
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [b.tolist() for b in e0 + e1]
    assert all(len(set(b["bucket"])) == 1 for b in batches)


@pytest.mark.parametrize("stop_after", [0, 1, 4, 6, 9])
def test_resume_yields_exactly_the_uninterrupted_batches(stop_after):
    kw = dict(seed=3, num_epochs=3, num_threads=2, prefetch=3)
    uninterrupted = _take(_loader(**kw), 100)
    assert len(uninterrupted) == 12
    first = _loader(**kw)
    head = _take(first, stop_after) if stop_after else []
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert (state["epoch"], state["position"]) == divmod(stop_after, 4)
    second = _loader(**kw)
    second.load_state_dict(state)
    assert head + _take(second, 100) == uninterrupted


def test_hosts_get_disjoint_slices_of_the_same_global_batch():
    whole = _take(_loader(num_epochs=2), 100)
    hosts = [_take(_loader(num_epochs=2, global_batch_size=4, process_index=p, process_count=2), 100)
             for p in range(2)]
    assert [a + b for a, b in zip(*hosts)] == whole
    # a run saved on 2 hosts resumes on 1 host at the same global step
    two = _loader(process_index=0, process_count=2, num_epochs=2)
    _take(two, 5)
    one = _loader(num_epochs=2)
    one.load_state_dict(two.state_dict())
    assert _take(one, 100) == whole[5:]


def test_state_from_another_configuration_is_refused():
    state = _loader(seed=1).state_dict()
    with pytest.raises(ValueError, match=r"seed: 1 vs 2"):
        _loader(seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"global_batch_size: 4 vs 2"):
        _loader(seed=1, global_batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _loader(process_count=3)
    with pytest.raises(ValueError, match=r"no bucket has global_batch_size=12 items"):
        _loader(global_batch_size=12)


def _failing_loader(bad, **kw):
    def load(i):
        if i in bad:
            raise DataError(f"/data/{i}.png", "corrupt", "cannot decode image")
        return {"index": np.int64(i)}

    return Loader(BUCKETS, load, global_batch_size=4, seed=0, num_epochs=1, **kw)


def test_bad_items_are_counted_named_and_masked_out_with_static_shapes():
    plan = [b.tolist() for b in epoch_plan(_loader().bucket_ids, 4, 0, 0)]
    victim = next(b for b in plan if BUCKETS[b[0]] == (32, 64))
    bad = {victim[0], victim[2]}
    loader = _failing_loader(bad)
    batches = list(loader)
    assert len(batches) == len(plan) and all(len(b["index"]) == 4 for b in batches)
    for b, planned in zip(batches, plan):
        assert b["valid"].tolist() == [i not in bad for i in planned]
        # good rows are the planned items; a bad row holds a copy of a good row of the same batch
        good_rows = [i for i, v in zip(b["index"].tolist(), b["valid"]) if v]
        assert good_rows == [i for i in planned if i not in bad]
        assert set(b["index"].tolist()) <= set(planned)
    assert dict(loader.skips.counts) == {"corrupt": 2}
    assert sorted(loader.skips.messages) == sorted(f"/data/{i}.png: cannot decode image" for i in bad)


def test_a_host_whose_rows_all_fail_still_yields_a_full_masked_batch():
    plan = [b.tolist() for b in epoch_plan(_loader().bucket_ids, 4, 0, 0)]
    victim = next(b for b in plan if BUCKETS[b[0]] == (64, 32))
    bad = set(victim[2:])  # host 1's two rows of that global batch
    host1 = list(_failing_loader(bad, process_index=1, process_count=2))
    host0 = list(_failing_loader(bad, process_index=0, process_count=2))
    assert len(host0) == len(host1) == len(plan)  # the hosts stay in step
    step = plan.index(victim)
    assert host1[step]["valid"].tolist() == [False, False]
    filler = host1[step]["index"].tolist()
    assert BUCKETS[filler[0]] == (64, 32) and filler[0] not in bad  # a loadable item of the same bucket
    assert host0[step]["valid"].all()
    whole_bucket = {i for i, b in enumerate(BUCKETS) if b == (32, 64)}
    with pytest.raises(RuntimeError, match=r"every item of bucket \(32, 64\) failed to load; first error: /"):
        list(_failing_loader(whole_bucket))


def test_manifest_loader_decodes_buckets_and_survives_every_bad_input(tmp_path):
    from PIL import Image

    good = [save_rgb(tmp_path / f"g{k}.png", 30, 40, seed=k) for k in range(3)]
    save_rgb(tmp_path / "tall.png", 40, 20)
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(tmp_path / "g16.png")
    Image.new("P", (40, 30), 3).save(tmp_path / "pal.gif")
    truncate(save_rgb(tmp_path / "trunc.png", 30, 40))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    save_rgb(tmp_path / "huge.png", 300, 400)
    save_rgb(tmp_path / "sliver.png", 1, 300)
    names = ["g0", "g1", "g2", "tall", "cmyk", "alpha", "g16", "pal",
             "trunc", "junk", "huge", "missing", "sliver"]
    paths = {n: next(iter(tmp_path.glob(f"{n}.*")), tmp_path / f"{n}.png") for n in names}
    items = [ManifestItem(id=n, source=str(paths[n]), instruction=f"edit {n}",
                          target=str(good[0]) if n == "g1" else None) for n in names]
    loader = manifest_loader(items, global_batch_size=1, seed=0, num_epochs=1, max_pixels=100_000,
                             target_area=64 * 64)
    batches = list(loader)
    served = {b["id"][0]: b for b in batches if b["valid"][0]}
    assert sorted(served) == sorted(["g0", "g1", "g2", "tall", "cmyk", "alpha", "g16", "pal"])
    assert len(batches) == 9 and sum(not b["valid"][0] for b in batches) == 1  # the truncated one, masked
    for name, batch in served.items():
        h, w = (96, 32) if name == "tall" else (64, 64)  # edit_dimensions(40, 30, 64 * 64) = (64, 64)
        assert batch["source"].shape == (1, h, w, 3) and batch["source"].dtype == np.uint8, name
        assert batch["instruction"] == [f"edit {name}"]
    assert served["g1"]["target"].shape == (1, 64, 64, 3) and served["g0"]["target"] == [None]
    assert (served["alpha"]["source"] == 255).all() and (served["g16"]["source"] == 255).all()
    assert dict(loader.skips.counts) == {"truncated": 1, "corrupt": 1, "too_large": 1, "missing": 1,
                                         "bad_aspect": 1}
    text = "\n".join(loader.skips.messages)
    for name, message in [("trunc", "cannot decode image: image file is truncated"),
                          ("junk", "not a readable image"),
                          ("huge", "400x300 = 120000 pixels exceeds the limit of 100000"),
                          ("missing", "no such file"), ("sliver", "aspect ratio of 300x1 is too extreme")]:
        assert f"{paths[name]}: {message}" in text, name
