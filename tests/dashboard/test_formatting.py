"""How the dashboard writes bus data as text (`omnidaemon.dashboard.formatting`)."""

from __future__ import annotations

from omnidaemon.dashboard.formatting import cut, pretty_json


def test_pretty_json_indents_and_keeps_integers_beyond_64_bits_as_numbers() -> None:
    assert pretty_json({"a": [1, "é"]}) == '{\n  "a": [\n    1,\n    "é"\n  ]\n}'
    assert pretty_json({"n": 2**70}) == '{\n  "n": 1180591620717411303424\n}'
    assert pretty_json({"when": object}).startswith('{\n  "when": "<class')


def test_cut_says_whether_it_cut() -> None:
    assert cut("abcdef", 3) == ("abc", True)
    assert cut("abc", 3) == ("abc", False)
