"""Messages are bytes with a checked kind and version; garbage is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privlora.federation.messages import Message, MessageError


def test_round_trip_keeps_header_and_tensors_exactly():
    t = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([7.0])}
    blob = Message("client_update", {"round": 3, "mechanism": {"steps": 2}}, t).to_bytes()
    back = Message.from_bytes(blob, "client_update")
    assert back.header == {"round": 3, "mechanism": {"steps": 2}}
    assert set(back.tensors) == {"w", "n"}
    assert np.array_equal(back.tensors["w"], t["w"]) and back.tensors["w"].dtype == np.float32


def test_wrong_kind_and_truncation_are_refused():
    blob = Message("round_instruction", {"round": 1}, {"x": np.zeros(3, np.float32)}).to_bytes()
    with pytest.raises(MessageError, match="expected a 'client_update' message"):
        Message.from_bytes(blob, "client_update")
    with pytest.raises(MessageError):
        Message.from_bytes(blob[: len(blob) // 2], "round_instruction")
    with pytest.raises(MessageError, match="expected bytes"):
        Message.from_bytes("text", "round_instruction")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_decode_or_crash_otherwise(blob):
    with pytest.raises(MessageError):
        Message.from_bytes(blob, "client_update")
