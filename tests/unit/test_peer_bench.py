"""`flock bench --peer litellm` without the peer: LiteLLM's generated config, the wrk script and its summary, the
"highest rate with p99 added latency within 20 ms" selection, the goal ratios, CPU accounting, and the message
when LiteLLM's virtualenv is missing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from bench import peer
from bench.peer import Point
from cli import main


def point(target: str, c: int, rps: float, p50: float, p99: float, errors: int = 0, requests: int = 1000) -> Point:
    return Point(target=target, concurrency=c, rps=rps, p50_ms=p50, p90_ms=p99, p99_ms=p99, max_ms=p99,
                 requests=requests, errors=errors, wrk_cpu=0.1, cpu_ms_per_request=1.0)


def test_litellm_config_forwards_one_model_to_the_backend_without_routing():
    config = yaml.safe_load(peer.litellm_config("http://127.0.0.1:9999/"))
    assert config["model_list"] == [{"model_name": "cooking", "litellm_params": {
        "model": "openai/cooking", "api_base": "http://127.0.0.1:9999/v1", "api_key": "none"}}]
    assert "router_settings" not in config and not config["general_settings"]


def test_wrk_script_carries_the_body_and_rejects_a_body_that_would_end_it():
    body = peer.request_body("auto")
    script = peer.wrk_script(body)
    assert f"[==[{body}]==]" in script and 'wrk.method = "POST"' in script and "FLOCK_WRK" in script
    assert json.loads(body)["messages"][0]["content"] == peer.PROMPT
    with pytest.raises(ValueError):
        peer.wrk_script('{"x": "]==]"}')


def test_parse_wrk_reads_the_summary_line_and_fails_without_one():
    out = 'Running 5s test\nFLOCK_WRK {"requests": 10, "duration_us": 1000000, "p50_us": 5, "p90_us": 6, ' \
          '"p99_us": 7, "max_us": 8, "errors": 0}\n'
    assert peer.parse_wrk(out)["requests"] == 10
    with pytest.raises(RuntimeError, match="no summary"):
        peer.parse_wrk("connection refused\n")


def test_run_wrk_turns_the_summary_into_a_point(tmp_path):
    fake = tmp_path / "wrk"
    fake.write_text('#!/bin/sh\necho \'FLOCK_WRK {"requests": 500, "duration_us": 2000000, "p50_us": 1500, '
                    '"p90_us": 2500, "p99_us": 9000, "max_us": 12000, "errors": 0}\'\n')
    fake.chmod(0o755)
    p = peer.run_wrk(str(fake), tmp_path / "s.lua", "http://x", "flock", 4, 2, [os.getpgid(0)])
    assert (p.rps, p.p50_ms, p.p99_ms, p.errors) == (250.0, 1.5, 9.0, 0)
    assert p.cpu_ms_per_request >= 0
    both = peer.run_wrk(str(fake), tmp_path / "s.lua", ["http://x", "http://y"], "flock-2p", 4, 2)
    assert (both.rps, both.requests, both.p99_ms, both.concurrency) == (500.0, 1000, 9.0, 4)  # rates add up
    empty = tmp_path / "wrk0"
    empty.write_text('#!/bin/sh\necho \'FLOCK_WRK {"requests": 0, "duration_us": 0, "p50_us": 0, "p90_us": 0, '
                     '"p99_us": 0, "max_us": 0, "errors": 0}\'\n')
    empty.chmod(0o755)
    assert peer.run_wrk(str(empty), tmp_path / "s.lua", "http://x", "flock", 1, 1).errors == 1  # nothing answered


def test_sustained_rate_is_the_highest_within_the_p99_limit_without_errors():
    points = [point("direct", 1, 5000, 0.1, 2), point("direct", 4, 6000, 0.3, 5), point("direct", 16, 7000, 1, 10),
              point("direct", 64, 7000, 4, 30),
              point("flock", 1, 800, 1, 5), point("flock", 4, 1100, 3, 20),  # added p99 15 ms: within
              point("flock", 16, 1400, 10, 31),  # added p99 21 ms: over
              point("flock", 64, 1500, 40, 45, errors=3)]  # within 20 ms of direct, but failed requests
    assert peer.sustained_rps(points, "flock") == 1100
    assert peer.sustained_rps(points, "flock", limit_ms=25) == 1400
    assert peer.peak_rps(points, "flock") == 1400
    assert peer.added(points, "flock")[1] == (0.9, 3)
    assert peer.sustained_rps(points, "litellm-1w") == 0.0


def test_summary_sets_flock_against_the_best_litellm_configuration():
    points = [point("direct", 1, 5000, 0.1, 2), point("direct", 4, 6000, 0.3, 5),
              point("flock", 1, 800, 1.1, 5), point("flock", 4, 1200, 3, 20),
              point("litellm-1w", 1, 90, 10.1, 18), point("litellm-1w", 4, 110, 40, 60),
              point("litellm-2w", 1, 100, 8.1, 23), point("litellm-2w", 4, 160, 25, 50)]
    s = peer.summarize(points)
    assert s["flock_sustained_rps"] == 1200 and s["litellm_sustained_rps"] == 90  # 2w never within 20 ms
    assert s["gateway_vs_litellm_rps_ratio"] == pytest.approx(1200 / 90)
    assert s["litellm_added_ms_p50_c1"] == pytest.approx(8.0)  # the lower of the two
    assert s["gateway_vs_litellm_added_ratio"] == pytest.approx(1.0 / 8.0)
    assert s["gateway_vs_litellm_peak_rps_ratio"] == pytest.approx(1200 / 160)
    assert set(s["by_target"]) == {"flock", "litellm-1w", "litellm-2w"}
    table = peer.table({**s, "points": [p.__dict__ for p in points]})
    assert "| `gateway_vs_litellm_rps_ratio` | 13.333 | >= 1.5 |" in table


def test_summary_takes_the_better_of_one_and_two_flock_processes():
    points = [point("direct", 1, 5000, 0.1, 2), point("direct", 4, 6000, 0.3, 5),
              point("flock", 1, 800, 1.1, 5), point("flock", 4, 1000, 3, 20),
              point("flock-2p", 4, 1500, 2, 15),  # two processes: not measured at concurrency 1
              point("litellm-1w", 1, 100, 10.1, 18), point("litellm-1w", 4, 110, 40, 60)]
    s = peer.summarize(points)
    assert s["flock_sustained_rps"] == 1500 and s["gateway_vs_litellm_rps_ratio"] == 15
    assert s["flock_added_ms_p50_c1"] == pytest.approx(1.0)  # the one process measured at concurrency 1
    assert s["by_target"]["flock-2p"]["sustained_rps"] == 1500


def test_ratio_is_undefined_when_litellm_never_meets_the_limit():
    points = [point("direct", 1, 5000, 0.1, 2), point("flock", 1, 800, 1, 5), point("litellm-1w", 1, 50, 20, 40)]
    s = peer.summarize(points)
    assert s["gateway_vs_litellm_rps_ratio"] is None and s["gateway_vs_litellm_peak_rps_ratio"] == 16
    assert "| `gateway_vs_litellm_rps_ratio` | n/a | >= 1.5 |" in peer.table({**s, "points": []})


def test_group_cpu_counts_this_process_groups_cpu():
    before = peer.group_cpu_s([os.getpgid(0)])
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    assert peer.group_cpu_s([os.getpgid(0)]) - before >= 0.2
    assert peer.group_cpu_s([2**22 + 12345]) == 0.0  # no such group


def test_missing_litellm_venv_says_how_to_make_it(tmp_path, capsys):
    with pytest.raises(peer.PeerMissing, match="make peer-litellm"):
        peer.litellm_executable(tmp_path)
    code = main(["bench", "--peer", "litellm", "--peer-venv", str(tmp_path / "none"), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "make peer-litellm" in err and str(tmp_path / "none" / "bin" / "litellm") in err


def test_many_experts_with_the_peer_stops_before_starting_when_the_peer_is_missing(tmp_path, monkeypatch, capsys):
    from bench import many_experts

    async def never(*args, **kwargs):
        raise AssertionError("the many-experts run started although the peer is missing")

    monkeypatch.setattr(many_experts, "run", never)
    code = main(["bench", "--many-experts", "10", "--peer", "litellm", "--peer-venv", str(tmp_path)])
    assert code == 2 and "make peer-litellm" in capsys.readouterr().err


def test_many_experts_with_the_peer_carries_the_goal_ratios(monkeypatch, capsys):
    from bench import many_experts
    from bench import run as bench_run

    async def fake_many(*args, **kwargs):
        return {"register_ms_p50_at_1000": 700.0}

    beside = {"gateway_vs_litellm_rps_ratio": 12.0, "gateway_vs_litellm_added_ratio": 0.1, "points": []}
    monkeypatch.setattr(many_experts, "run", fake_many)
    monkeypatch.setattr(bench_run, "peer_missing", lambda args: None)
    monkeypatch.setattr(peer, "run", lambda *args, **kwargs: beside)
    assert main(["bench", "--many-experts", "10", "--peer", "litellm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gateway_vs_litellm_rps_ratio"] == 12.0 and out["gateway_vs_litellm_added_ratio"] == 0.1
    assert out["register_ms_p50_at_1000"] == 700.0 and out["peer_litellm"] == beside


def test_missing_wrk_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(peer.shutil, "which", lambda name: None)
    with pytest.raises(peer.PeerMissing, match="apt-get install wrk"):
        peer.wrk_executable()


def test_the_default_venv_is_in_the_repository_and_ignored_by_git():
    assert peer.DEFAULT_VENV == Path(__file__).resolve().parents[2] / ".venv-litellm"
    assert ".venv-litellm/" in (Path(__file__).resolve().parents[2] / ".gitignore").read_text().splitlines()
