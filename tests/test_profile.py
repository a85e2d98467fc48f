"""The profile format: units, validation errors with file:line:column, scaling, loading, fuzzing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultproxy.errors import ProfileError
from faultproxy.profile import json_schema, load_profile, load_text, shipped_profiles
from faultproxy.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    "text,seconds",
    [("250ms", 0.25), ("1.5s", 1.5), ("2m", 120), ("1h", 3600), (3, 3.0), (0.5, 0.5), ("10", 10.0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text,size",
    [("4k", 4096), ("4KiB", 4096), ("4KB", 4000), ("1m", 1 << 20), ("1MiB", 1 << 20), ("1MB", 10**6), (512, 512)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_rates():
    assert parse_rate("64KiB/s") == 65536
    assert parse_rate("1MB/s") == 10**6
    assert parse_rate(100) == 100


@pytest.mark.parametrize("bad", ["soon", "-1s", "1d", "", True, None, [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    return [f"{i.line}:{i.column} {i.field}: {i.message}" for i in info.value.issues]


def test_error_names_line_column_field_and_expectation(tmp_path):
    path = write(
        tmp_path,
        """
        version: 1
        rules:
          - name: read-timeout
            faults:
              - type: delay
                time: 1s
              - type: cut
                after: soon
        """,
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    text = str(info.value)
    assert text.endswith("p.yaml:8:16: rules[0].faults[1].after: expected a duration like '30s' or '250ms', got 'soon'")


def test_all_errors_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """
        version: 1
        rules:
          - name: a
            match: {methd: GET, probability: 2}
            faults:
              - {type: delay, time: soon}
              - {type: nope}
          - name: a
            faults:
              - {type: throttle, rate: fast}
              - {type: buffer}
        """,
    )
    found = issues_of(path)
    expected = [
        "4:13 rules[0].match.methd: unknown key 'methd'",
        "4:38 rules[0].match.probability: expected less than or equal to 1",
        "6:29 rules[0].faults[0].time: expected a duration",
        "7:16 rules[0].faults[1].type: unknown fault type 'nope'",
        "8:11 rules[1].name: duplicate rule name 'a'",
        "10:32 rules[1].faults[0].rate: expected a rate",
        "11:9 rules[1].faults[1]: give exactly one of size",
    ]
    assert len(found) == len(expected), found
    for got, want in zip(found, expected):
        assert got.startswith(want), (got, want)


def test_impossible_combination_request_fault_with_response_condition(tmp_path):
    path = write(
        tmp_path,
        """
        version: 1
        rules:
          - name: r
            match:
              status: [200]
            faults:
              - {type: delay, time: 1s}
        """,
    )
    (issue,) = issues_of(path)
    assert issue.startswith("5:15 rules[0].match.status: a response condition cannot select a fault that acts before")


def test_trigger_exclusive_and_missing_fields(tmp_path):
    path = write(
        tmp_path,
        """
        version: 1
        rules:
          - name: r
            faults:
              - {type: cut, after: 1s, after_events: 3}
              - {type: delay}
          - faults: [{type: delay, time: 1}]
        """,
    )
    found = issues_of(path)
    assert any("rules[0].faults[0]: give exactly one trigger" in f for f in found), found
    assert any("rules[0].faults[1].time: required field is missing" in f for f in found), found
    assert any("rules[1].name: required field is missing" in f for f in found), found


def test_yaml_syntax_error_and_tags(tmp_path):
    found = issues_of(write(tmp_path, "version: 1\nrules: [\n", "syntax.yaml"))
    assert found[0].startswith("3:1 : invalid YAML") or "invalid YAML" in found[0]
    found = issues_of(write(tmp_path, "version: 1\nrules: !!python/object:os.system {}\n", "tag.yaml"))
    assert "YAML tag" in found[0] and found[0].startswith("2:8")


def test_unknown_top_level_key_and_version(tmp_path):
    found = issues_of(write(tmp_path, "version: 2\nrulez: []\n"))
    assert found[0].startswith("1:10 version: expected 1")
    assert found[1].startswith("2:1 rulez: unknown key 'rulez'")


def test_time_scale_multiplies_every_duration():
    profile = load_profile(
        {
            "version": 1,
            "rules": [
                {
                    "name": "r",
                    "active": {"after": "10s", "for": "5s", "every": "1m"},
                    "faults": [
                        {"type": "timeout", "after": "60s", "action": "goaway", "grace": "2s"},
                        {"type": "stall", "for": "3s", "after": "1s"},
                        {"type": "delay", "time": "250ms", "jitter": "100ms"},
                        {"type": "throttle", "rate": "64KiB/s"},
                    ],
                }
            ],
        }
    )
    scaled = profile.scaled(0.01).rules[0]
    timeout, stall, delay, throttle = scaled.faults
    assert timeout.after == pytest.approx(0.6) and timeout.grace == pytest.approx(0.02)
    assert stall.for_ == pytest.approx(0.03) and stall.after == pytest.approx(0.01)
    assert delay.time == pytest.approx(0.0025) and delay.jitter == pytest.approx(0.001)
    assert throttle.rate == 65536  # rates are not durations
    assert scaled.active.after == pytest.approx(0.1) and scaled.active.every == pytest.approx(0.6)


def test_extends_and_override(tmp_path):
    write(tmp_path, "version: 1\nrules:\n  - {name: a, faults: [{type: delay, time: 1}]}\n  - {name: b, faults: [{type: delay, time: 2}]}\n", "base.yaml")
    child = write(tmp_path, "version: 1\nextends: base.yaml\nrules:\n  - {name: b, faults: [{type: delay, time: 5}]}\n  - {name: c, faults: [{type: delay, time: 3}]}\n", "child.yaml")
    profile = load_profile(str(child))
    assert [(r.name, r.faults[0].time) for r in profile.rules] == [("a", 1), ("b", 5), ("c", 3)]


def test_extends_cycle_and_missing(tmp_path):
    write(tmp_path, "version: 1\nextends: y.yaml\n", "x.yaml")
    write(tmp_path, "version: 1\nextends: x.yaml\n", "y.yaml")
    with pytest.raises(ProfileError, match="extends itself"):
        load_profile(str(tmp_path / "x.yaml"))
    found = issues_of(write(tmp_path, "version: 1\nextends: [nowhere]\n", "z.yaml"))
    assert found[0].startswith("2:11 extends[0]: no profile file 'nowhere'")


def test_shipped_profiles_valid():
    shipped = shipped_profiles()
    assert "h2-rst-stream" in shipped
    for name in shipped:
        assert load_profile(name).name == name


def test_schema_lists_every_fault_kind():
    schema = json_schema()
    text = str(schema)
    for kind in ("delay", "abort", "buffer", "compress", "throttle", "slice", "stall", "timeout", "cut"):
        assert f"'{kind}'" in text


# --- fuzz: whatever the document, the loader raises nothing but ProfileError ----------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1s", "soon", "4k", "64KiB/s", "all", "GET", "rst_stream", "CANCEL", "*", "[", "delay", "cut"]),
    st.text(max_size=8),
)
_keys = st.sampled_from(
    ["version", "name", "rules", "faults", "type", "match", "after", "after_events", "size", "rate", "time",
     "phase", "action", "code", "host", "path", "status", "extends", "active", "for", "every", "x"]
)
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)
_kinds = st.sampled_from(["delay", "abort", "buffer", "compress", "throttle", "slice", "stall", "timeout", "cut", "bogus"])
_fault = st.builds(lambda k, extra: {"type": k, **extra}, _kinds, st.dictionaries(_keys, _scalars, max_size=4))
_profile_like = st.builds(
    lambda v, rules: {"version": v, "rules": rules},
    st.sampled_from([1, 1, 2, "1"]),
    st.lists(st.builds(lambda n, f, m: {"name": n, "faults": f, "match": m}, st.sampled_from(["a", "b", ""]), st.lists(_fault, max_size=3), st.dictionaries(_keys, _scalars, max_size=3)), max_size=3),
)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(_docs, _profile_like))
def test_fuzz_structured_documents(doc):
    text = yaml.safe_dump(doc) if not isinstance(doc, str) else doc
    try:
        load_text(text, "fuzz.yaml")
    except ProfileError as e:
        assert e.issues and all(str(i).startswith("fuzz.yaml") for i in e.issues)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.sampled_from(list("version: 1\nrules:- name{}[]&*!|>'\"#%@`\t ,?type:delaycut0129")), max_size=120))
def test_fuzz_raw_text(text):
    try:
        load_text(text, "raw.yaml")
    except ProfileError as e:
        assert e.issues
