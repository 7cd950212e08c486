"""The sidecar's /chat endpoint (the benchmark judges' way in) on a tiny random Qwen2.5-VL served by a real
sidecar process: interleaved text and images arrive in order, batching changes nothing, sampling is seeded,
and bad items are refused with the field named."""

import numpy as np
import pytest

from cogniedit_jax.sidecar.client import SidecarClient, SidecarRequestError


@pytest.fixture(scope="module")
def chat_client(tmp_path_factory):
    from cogniedit_jax.sidecar.tiny import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vl"))
    client = SidecarClient({"spawn": True, "chat": str(tiny), "device": "cpu", "timeout_s": 120,
                            "log_file": str(tmp_path_factory.mktemp("logs") / "chat.log")})
    with client:
        yield client, tiny


def _img(seed, hw):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def test_chat_matches_generate_chat_in_process_and_batches_like_single_requests(chat_client):
    from cogniedit_jax.sidecar.vl import generate_chat, load_vl

    client, tiny = chat_client
    turns = [[{"text": "Describe the key features"}, {"image": _img(1, (32, 48))}, {"text": "This is the edited image:"},
              {"image": _img(2, (40, 40))}],
             [{"image": _img(3, (28, 28))}, {"text": "Change the car"}]]
    batched = client.chat(turns, max_new_tokens=6)
    single = [client.chat([t], max_new_tokens=6)[0] for t in turns]
    assert batched == single and all(isinstance(a, str) for a in batched)
    local = generate_chat(load_vl(tiny, "cpu"), turns, 6)
    assert batched == local  # the endpoint is generate_chat over the wire, parts in the given order
    sampled = [client.chat(turns[:1], max_new_tokens=6, temperature=1.0, seed=s)[0] for s in (5, 5)]
    assert sampled[0] == sampled[1]  # seeded sampling repeats


def test_chat_refuses_bad_items_naming_the_field(chat_client):
    client, _ = chat_client
    with pytest.raises(SidecarRequestError, match=r"items\[0\]\.content\[0\]: expected") as e:
        client._post_items("chat", [{"content": [{"txt": "x"}]}])
    assert e.value.status == 400
    with pytest.raises(SidecarRequestError, match=r"items\[0\]\.max_new_tokens: expected an integer in 1\.\.2048"):
        client._post_items("chat", [{"content": [{"text": "x"}], "max_new_tokens": 10**6}])
    assert client.health()["endpoints"] == ["chat"]
