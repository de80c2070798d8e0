"""OpenAI's Images API, driven by OpenAI's own Python client (`openai`) pointed at `pixart serve` by `base_url`
alone: b64_json and URL results, n=2, our fields through `extra_body`, streaming with partial images, a bad size, a
missing key. On the real engine (the embedded default's export), so the images are the model's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.support.servers import ServerProcess

KEY = "sk-pixart-test-0123456789"
JS = Path(__file__).resolve().parents[1] / "js"
CHEAP = {"num_inference_steps": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("run") / "store", "--api-key", KEY)  # as a user starts it
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server.http_port}/v1", max_retries=0,
                         timeout=120)


def _picture(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_b64_json_n_2_with_our_fields_in_extra_body(client) -> None:
    answer = client.images.generate(model="pixart-sigma", prompt="a red circle on a blue background", n=2,
                                    size="512x256", extra_body={"seed": 7, "negative_prompt": "green", **CHEAP})
    assert len(answer.data) == 2 and answer.size == "512x256"
    pictures = [_picture(base64.b64decode(image.b64_json)) for image in answer.data]
    assert [p.size for p in pictures] == [(512, 256)] * 2 and pictures[0].format == "PNG"
    again = client.images.generate(prompt="a red circle on a blue background", size="512x256",
                                   extra_body={"seed": 7, "negative_prompt": "green", **CHEAP})
    assert again.data[0].b64_json == answer.data[0].b64_json  # the seed makes it repeatable


def test_url_results_are_the_servers_signed_urls(client) -> None:
    answer = client.images.generate(prompt="a yellow square", response_format="url", output_format="webp",
                                    extra_body=CHEAP)
    url = answer.data[0].url
    assert "/results/" in url and "signature=" in url and answer.data[0].b64_json is None
    fetched = httpx.get(url, timeout=30)  # a browser's fetch: no key, just the URL
    assert fetched.status_code == 200 and _picture(fetched.content).format == "WEBP"


def test_streaming_sends_partial_images_then_the_image(client) -> None:
    events = list(client.images.generate(prompt="a green triangle", stream=True, partial_images=2,
                                         size="256x256", extra_body={"num_inference_steps": 9}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    preview = _picture(base64.b64decode(events[0].b64_json))
    assert preview.format == "JPEG" and max(preview.size) <= 256
    assert _picture(base64.b64decode(events[-1].b64_json)).size == (256, 256)


def test_a_bad_size_is_400_naming_it_and_a_missing_key_is_401(client, server) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="100x100")
    assert bad.value.status_code == 400 and bad.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", extra_body={"guidance_scale": 99})
    assert bad.value.body["param"] == "guidance_scale"
    nobody = openai.OpenAI(api_key="sk-wrong", base_url=f"http://127.0.0.1:{server.http_port}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        nobody.images.generate(prompt="x")
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    assert [m.id for m in client.models.list()] == ["fal-ai/pixart-sigma", "pixart-sigma"]


def test_openais_javascript_client_works_by_base_url_alone(server) -> None:
    """The same through the `openai` npm package (tests/js, pinned by its lockfile)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: OpenAI's JavaScript client cannot run here")
    if not (JS / "node_modules" / "openai").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot install the openai npm package")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True,
                       timeout=300)
    env = {**os.environ, "OPENAI_BASE": f"http://127.0.0.1:{server.http_port}", "OPENAI_KEY": KEY}
    done = subprocess.run([node, "openai.mjs"], cwd=JS, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["b64"] == ["PNG", "PNG"] and seen["answered_size"] == "512x256"
    assert "/results/" in seen["url"] and "signature=" in seen["url"]
    assert seen["events"] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert seen["bad_size"] == {"status": 400, "param": "size", "code": "invalid_size"}
    assert seen["key"]["status"] == 401 and seen["key"]["code"] == "invalid_api_key"
