"""The versioned gated-composite header: one encoder and decoder for the builder and the engine, and an engine
that refuses a version it does not know instead of serving the composite ungated."""

from __future__ import annotations

import logging

import pytest
import torch

from adapters.engine import slots
from adapters.engine.gated_format import (
    FORMAT_VERSION,
    GATE_CODES,
    SCORE_STEP,
    UnknownFormat,
    decode_header,
    encode_header,
    is_header,
)
from service.backend import Capabilities


def test_header_round_trip():
    row = encode_header(64, "arrow", 2, 3.0, [4, 2], [0.0, -0.1], [1.0, 0.0])
    assert is_header(row)
    h = decode_header(row)
    assert (h.version, h.kind, h.top_k, h.alpha, h.ranks) == (FORMAT_VERSION, GATE_CODES["arrow"], 2, 3.0, [4, 2])
    assert h.gate_start == 6 and h.present.tolist() == [True, False]
    assert torch.allclose(h.steps * SCORE_STEP, torch.tensor([0.0, -0.1]))
    assert h.bias()[1] == float("-inf")


def test_header_too_wide_for_the_module():
    with pytest.raises(ValueError, match="too small"):
        encode_header(8, "phatgoose", 2, 1.0, [4, 4], [0.0, 0.0], [1.0, 1.0])


def test_unknown_version_is_refused():
    row = encode_header(64, "phatgoose", 2, 1.0, [4, 4], [0.0, 0.0], [1.0, 1.0])
    row[1] = FORMAT_VERSION + 1
    assert is_header(row)
    with pytest.raises(UnknownFormat, match="version"):
        decode_header(row)


def test_engine_removes_a_composite_it_cannot_read(caplog):
    """A slot whose header has another version keeps no LoRA (its tokens get the base layer), with an error
    logged: never the ungated sum of every candidate and gate row."""
    ranks, width = [2, 2], 32
    a = torch.zeros(2, 8, width)
    a[0, :4] = torch.randn(4, width)  # the candidates' blocks
    a[0, 4:6] = torch.randn(2, width)  # gate rows
    a[0, 6] = encode_header(width, "arrow", 1, 0.0, ranks, [0.0, 0.0], [1.0, 1.0])
    a[1, :3] = torch.randn(3, width)  # a plain adapter in the next slot
    assert set(slots.buffer_slots(a, "a").gates) == {0}
    a[0, 6, 1] = FORMAT_VERSION + 1  # slot 0 written again with a composite of another version
    with caplog.at_level(logging.ERROR):
        data = slots.set_slot(a, "a", 0)  # as after vLLM's activate_adapter
    assert data.gates == {} and data.refused == {0} and data.ranks[0] == 0
    assert "cannot apply" in caplog.text
    assert not a[0].any() and a[1, :3].any()  # the refused slot's LoRA is gone; the plain adapter untouched


@pytest.mark.parametrize("status, body, gated", [
    (200, {"plugin": "flock", "gated_format": FORMAT_VERSION, "platform": "cpu", "gated": True}, True),
    (200, {"plugin": "flock", "gated_format": FORMAT_VERSION + 1, "platform": "cpu", "gated": True}, False),
    (200, {"plugin": "flock", "gated_format": FORMAT_VERSION, "platform": "cuda", "gated": False}, False),
    (404, {"detail": "Not Found"}, False),
    (200, {"something": "else"}, False),
])
def test_capabilities_from_a_backends_answer(status, body, gated):
    caps = Capabilities.from_answer(status, body)
    assert caps.gated is gated and caps.plugin is (status == 200 and body.get("plugin") == "flock")
