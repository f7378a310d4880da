"""`flock route --jsonl` prints the same decisions as POST /v1/route, without a server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_route_jsonl_matches_http(gateway, expert_root, tmp_path):
    prompts = ["How do I make pizza dough?", "What is 17 times 3?", "Who painted the Sistine Chapel?"]
    lines = [json.dumps({"prompt": prompts[0]}), json.dumps({"messages": [{"role": "user", "content": prompts[1]}]}),
             json.dumps({"prompt": prompts[2]})]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "FLOCK_STATE_DIR": str(gateway.state_dir), "FLOCK_EXPERT_ROOTS": str(expert_root)}
    out = subprocess.run([str(REPO / ".venv/bin/flock"), "route", "--jsonl", str(tmp_path / "q.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    offline = [json.loads(line) for line in out.stdout.splitlines()]
    import httpx

    online = [httpx.post(gateway.url + "/v1/route", json={"prompt": p}).json() for p in prompts]
    strip = lambda d: {**d["routing"], "cached": None}  # noqa: E731
    assert [strip(d) for d in offline] == [strip(d) for d in online]
    assert offline[0]["routing"]["experts"][0]["name"] == "cooking"
    assert offline[2]["routing"]["experts"] == []


def test_route_jsonl_bad_line(tmp_path, gateway, expert_root):
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    env = {**os.environ, "FLOCK_STATE_DIR": str(gateway.state_dir), "FLOCK_EXPERT_ROOTS": str(expert_root)}
    out = subprocess.run([str(REPO / ".venv/bin/flock"), "route", "--jsonl", str(tmp_path / "bad.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "line 1" in out.stderr and "Traceback" not in out.stderr
