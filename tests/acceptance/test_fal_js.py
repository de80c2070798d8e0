"""fal's JavaScript client (`@fal-ai/client` 1.10.1, pinned by tests/js/package-lock.json) against `pixart serve`
over TLS, redirected by configuration alone: requestMiddleware, and proxyUrl with when: "always".

`make install` installs it where Node.js and npm are present; without them this test is skipped and says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.test_fal import KEY, Hook, server, tls  # noqa: F401  (the same TLS server fixture)
from tests.support.servers import wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

JS = Path(__file__).resolve().parents[1] / "js"


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("Node.js is not installed: the JavaScript client's acceptance test needs it (make install "
                    "installs the client with npm where Node.js is present)")
    if not (JS / "node_modules" / "@fal-ai" / "client").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot install @fal-ai/client for the acceptance test")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True,
                       timeout=240)
    return path


@pytest.mark.parametrize("mode", ["middleware", "proxy"])
def test_fal_js_client_works_by_configuration_alone(node, server, tls, mode) -> None:  # noqa: F811
    hook = Hook()
    env = dict(os.environ, FAL_BASE=f"https://127.0.0.1:{server.http_port}", FAL_KEY=KEY, MODE=mode,
               HOOK=hook.url, NODE_EXTRA_CA_CERTS=str(tls[0]))
    try:
        done = subprocess.run([node, "acceptance.mjs"], cwd=JS, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        for sub in ("subscribe_polling", "subscribe_streaming"):
            assert out[sub]["seed"] == 5 and len(out[sub]["requestId"]) == 32
            assert "COMPLETED" in out[sub]["statuses"] and out[sub]["logs"] > 0, out[sub]
        assert out["submit"]["status"] == "IN_QUEUE" and out["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        assert out["result"] == 1 and out["run"] == "data:image/png;base64,"
        assert out["invalid"]["status"] == 422 and {"body.prompt", "body.num_images"} <= set(out["invalid"]["fields"])
        wait_for(lambda: hook.calls)
        assert json.loads(hook.calls[0][1])["request_id"] == out["submit"]["requestId"]
        wait_for(lambda: server.app.store.get(out["cancelled"]).state == "CANCELED")
    finally:
        hook.close()
