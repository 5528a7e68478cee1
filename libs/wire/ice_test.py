"""ICE credential rules at their edges."""

from __future__ import annotations

import pytest

from libs.wire.ice import credential_problem

PWD = "a" * 22


@pytest.mark.parametrize(
    ("ufrag", "pwd", "problem"),
    [
        ("abcd", PWD, None),
        ("a+/9" * 64, "Z" * 256, None),
        ("abc", PWD, "ice_ufrag: length 3 outside 4 to 256"),
        ("a" * 257, PWD, "ice_ufrag: length 257 outside 4 to 256"),
        ("ab-d", PWD, "ice_ufrag: only ice-chars"),
        ("abcd", "a" * 21, "ice_pwd: length 21 outside 22 to 256"),
        ("abcd", "a" * 21 + " ", "ice_pwd: only ice-chars"),
        ("abcd", "a" * 21 + "\n", "ice_pwd: only ice-chars"),
        ("abcé", PWD, "ice_ufrag: only ice-chars"),
    ],
)
def test_credentials(ufrag: str, pwd: str, problem: str | None) -> None:
    found = credential_problem(ufrag, pwd)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)
