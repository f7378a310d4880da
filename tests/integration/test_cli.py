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
    # The same decisions. Scores agree to within embedding noise only: the gateway embedded its experts' cards as
    # they were registered, one pool change at a time, `flock route` all at once, and int8 embeddings depend a
    # little on the batch they are computed in.
    def decision(d: dict) -> tuple:
        r = d["routing"]
        return r["mode"], [(e["name"], e["weight"]) for e in r["experts"]], r["gate"]

    assert [decision(d) for d in offline] == [decision(d) for d in online]
    for off, on in zip(offline, online, strict=True):
        for a, b in zip(off["routing"]["experts"], on["routing"]["experts"], strict=True):
            assert abs(a["score"] - b["score"]) < 0.03, (off, on)
    assert offline[0]["routing"]["experts"][0]["name"] == "cooking"
    assert offline[2]["routing"]["experts"] == []


def test_route_jsonl_bad_line(tmp_path, gateway, expert_root):
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    env = {**os.environ, "FLOCK_STATE_DIR": str(gateway.state_dir), "FLOCK_EXPERT_ROOTS": str(expert_root)}
    out = subprocess.run([str(REPO / ".venv/bin/flock"), "route", "--jsonl", str(tmp_path / "bad.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "line 1" in out.stderr and "Traceback" not in out.stderr


def test_experts_cli_through_the_gateway(gateway):
    out = subprocess.run([str(REPO / ".venv/bin/flock"), "experts", "--url", gateway.url, "list"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = {e["name"] for e in json.loads(out.stdout)["data"]}
    assert {"cooking", "arith", "sqlgen"} <= names


def test_experts_cli_offline_add_and_remove(tmp_path, expert_root, shape):
    """Without a gateway the CLI edits the pool file; a bad path is refused with a message, not a traceback."""
    from adapters.card import ExpertCard
    from tests.conftest import BASE, free_port
    from training.synthetic import write_random_lora

    path = write_random_lora(expert_root / "cli_offline", shape=shape, base_name=BASE, seed=70,
                             card=ExpertCard(name="cli_offline", description="Offline registration test."))
    env = {**os.environ, "FLOCK_STATE_DIR": str(tmp_path / "state"), "FLOCK_EXPERT_ROOTS": str(expert_root),
           "FLOCK_LIBRARY_DIR": str(tmp_path / "nolib"), "FLOCK_PORT": str(free_port())}
    flock = str(REPO / ".venv/bin/flock")
    run = lambda *a: subprocess.run([flock, "experts", *a], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("add", str(path)).returncode == 0
    listed = run("list")
    assert "cli_offline" in listed.stdout and "1 experts" in listed.stdout
    bad = run("add", "/etc")
    assert bad.returncode == 1 and "outside the allowed expert roots" in bad.stderr and "Traceback" not in bad.stderr
    assert run("remove", "cli_offline").returncode == 0
    assert "0 experts" in run("list").stdout
