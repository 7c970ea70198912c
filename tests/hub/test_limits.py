"""hub/limits.py's pure parts: inflating to a cap and counting JSON values."""

from __future__ import annotations

import gzip
import os

import pytest

from hub.limits import TooLargeError, check_items, inflate
from shared.errors import ProtocolError


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024 - 1, 1024 * 1024, 3 * 1024 * 1024 + 7])
def test_inflate_gives_back_the_bytes_up_to_the_cap(size: int) -> None:
    raw = os.urandom(size // 2) + b"x" * (size - size // 2)
    assert inflate(gzip.compress(raw), "gzip", size) == raw
    if size:
        with pytest.raises(TooLargeError, match=f"past the {size - 1} byte limit"):
            inflate(gzip.compress(raw), "GZIP", size - 1)


def test_inflate_refuses_corrupt_cut_and_unknown_encodings() -> None:
    packed = gzip.compress(b'{"protocol": 2, "changes": []}')
    with pytest.raises(ProtocolError, match="cut short"):
        inflate(packed[:-12], "gzip", 1000)
    with pytest.raises(ProtocolError, match="corrupt"):
        inflate(b"not gzip at all", "gzip", 1000)
    with pytest.raises(ProtocolError, match="unsupported Content-Encoding 'br'"):
        inflate(packed, "br", 1000)
    assert inflate(b"as sent", "identity", 1) == b"as sent"  # identity: read_body's cap


def test_check_items_counts_commas_brackets_and_braces() -> None:
    check_items(b'{"a":[1,2,{}]}', 5)  # { [ , , { : five
    with pytest.raises(TooLargeError, match="more than 4 JSON values"):
        check_items(b'{"a":[1,2,{}]}', 4)
