"""Property tests: whatever bytes a data file holds, validate and stats answer with an exit code
in {0, 1, 2} and never a traceback."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llamalora.cli.main import app

from conftest import GOOD

runner = CliRunner()
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)
records = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "system", "image", "images", "messages",
                     "response", "x"]), json_values, max_size=5)


def _mangle(line: str, cut: int, junk: bytes) -> bytes:
    data = line.encode("utf-8")
    cut = cut % (len(data) + 1)
    return data[:cut] + junk + data[cut:]


def _assert_clean(result):
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    for cmd in (["validate", str(path), "--json"], ["stats", str(path), "--tokenizer", "bundled"]):
        _assert_clean(runner.invoke(app, cmd))


@SETTINGS
@given(recs=st.lists(records, max_size=6), cut=st.integers(0, 200),
       junk=st.sampled_from([b"", b"\xff", b"{", b"\n", b"\r\n", b"\x00", b'"', b"]"]),
       as_array=st.booleans())
def test_mangled_records(tmp_path, recs, cut, junk, as_array):
    lines = [json.dumps(r) for r in [GOOD[0], *recs]]
    if as_array:
        body = _mangle("[" + ",\n".join(lines) + "]", cut, junk)
    else:
        body = b"\n".join(_mangle(line, cut, junk) if i == 1 else line.encode()
                          for i, line in enumerate(lines))
    path = tmp_path / "m.jsonl"
    path.write_bytes(body)
    result = runner.invoke(app, ["validate", str(path), "--json"])
    _assert_clean(result)
    report = json.loads(result.stdout)
    assert (result.exit_code == 1) == bool(report["errors"])
    _assert_clean(runner.invoke(app, ["stats", str(path), "--tokenizer", "bundled", "--json"]))
