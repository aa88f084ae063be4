"""Bad input, fuzzed: every malformed file or config gets a message naming the file, line or key,
exit status 2, and nothing half-written, never a traceback."""

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecoadapt import config
from ecoadapt.cli import main
from ecoadapt.core.errors import UserError
from ecoadapt.data import readers
from helpers.runs import write_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
good_line = st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40))
odd_line = st.one_of(
    json_values.map(json.dumps),  # valid JSON, maybe not an object, maybe no "text"
    st.text(max_size=60),  # not JSON at all
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1000, 100_000)),  # nested too deep
    st.builds(lambda n: json.dumps({"text": "x" * n}), st.integers(10_000, 2_000_000)),  # a huge line
    st.builds(lambda n: "9" * n, st.integers(4400, 6000)),  # an integer Python refuses to parse
    st.sampled_from(['{"text": "a\u2028b"}', '{"text": "form\x0cfeed"}', "\x00", "\ufeff{}"]),
)


def check_read(path, text_field="text"):
    """Reading either works or fails with a UserError naming the file; nothing else."""
    try:
        docs = list(readers.read(str(path), text_field))
    except UserError as e:
        assert str(path) in str(e)
        return None
    assert all(d.text and d.text == d.text.strip() for d in docs)
    return docs


@FUZZ
@given(lines=st.lists(st.one_of(good_line, odd_line), max_size=8))
def test_fuzzed_jsonl_reads_or_names_the_file_and_line(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    docs = check_read(path)
    if docs is not None:
        # Line numbers are those an editor shows: U+2028 inside a string does not split a line.
        # A text longer than readers.PIECE_CHARS comes in pieces cut at whitespace (or, where
        # there is none, anywhere): together they hold every character of it but the spaces.
        by_line: dict[int, list[str]] = {}
        for doc in docs:
            by_line.setdefault(int(doc.source.rsplit(":", 1)[1]), []).append(doc.text)
        for lineno, pieces in by_line.items():
            text = json.loads(lines[lineno - 1])["text"]
            assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())
            assert len(pieces) == 1 or all(len(p) <= readers.PIECE_CHARS for p in pieces)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]))
def test_fuzzed_bytes_in_any_format_read_or_name_the_file(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    check_read(path)


@FUZZ
@given(
    header=st.lists(st.text(string.ascii_letters, min_size=1, max_size=6), min_size=1, max_size=4),
    rows=st.lists(st.lists(st.text(max_size=20), max_size=5), max_size=6),
    huge=st.booleans(),
)
def test_fuzzed_csv_reads_or_names_the_file_and_line(tmp_path, header, rows, huge):
    import csv

    path = tmp_path / "fuzz.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
        if huge:
            writer.writerow(["y" * 300_000] * len(header))  # beyond the csv module's default limit
    docs = check_read(path, header[0])
    if docs is not None and huge:  # in pieces, as every document longer than readers.PIECE_CHARS
        tail = [d.text for d in docs if d.source == docs[-1].source]
        assert "".join(tail) == "y" * 300_000 and all(len(p) <= readers.PIECE_CHARS for p in tail)


keys = [k for k, *_ in config.all_keys()]
yaml_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "0", "1e-4", "all", "auto"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
BASE = {"model": {"name_or_path": "m"}, "data": {"train": ["c.txt"]}}


@FUZZ
@given(key=st.sampled_from(keys), value=yaml_values)
def test_fuzzed_config_values_are_accepted_or_name_their_key(key, value):
    section, name = key.split(".")
    raw = {s: dict(v) for s, v in BASE.items()}
    raw.setdefault(section, {})[name] = value
    try:
        cfg = config.from_dict(raw, "fuzz.yaml")
    except UserError as e:
        assert str(e).startswith("fuzz.yaml") and key in str(e), str(e)
        return
    got = cfg.to_dict()[section][name]
    if isinstance(got, float):
        assert got == got and abs(got) != float("inf")  # no nan or inf gets through


@FUZZ
@given(
    section=st.text(string.ascii_lowercase + "_", min_size=1, max_size=10),
    name=st.text(string.ascii_lowercase + "_", min_size=1, max_size=14),
)
def test_unknown_keys_are_named(section, name):
    known = {k for k in keys}
    if f"{section}.{name}" in known:
        return
    with pytest.raises(UserError, match="unknown (section|key)"):
        config.from_dict({**BASE, section: {name: 1}}, "fuzz.yaml")


CONTRADICTIONS = [
    ({"train": {"max_steps": None, "epochs": None}}, "train.max_steps"),
    ({"train": {"early_stop": 2}}, "train.early_stop"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"lr": -1e-4}}, "train.lr"),
    ({"train": {"save_every": 0}}, "train.save_every"),
    ({"train": {"save_every": 10}, "parallel": {"strategy": "fsdp"}}, "train.save_every"),
    ({"output": {"resume": True, "overwrite": True}}, "output.resume"),
    ({"precision": {"mode": "bf16-pure", "layers": "auto"}}, "precision.layers"),
    ({"budget": {"energy_j": 10}, "measure": {"energy": "off"}}, "budget.energy_j"),
    ({"train": {"rollback_lr_factor": 0}}, "train.rollback_lr_factor"),
]


@pytest.mark.parametrize(("extra", "key"), CONTRADICTIONS, ids=[k for _, k in CONTRADICTIONS])
def test_contradictory_settings_name_the_key(extra, key):
    raw = {s: dict(v) for s, v in BASE.items()}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.from_dict(raw, "fuzz.yaml")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=odd_line.filter(lambda line: not line.startswith('{"text"')), at=st.integers(0, 50))
def test_adapt_with_a_fuzzed_corpus_line_exits_2_naming_it_and_writes_nothing(
    tmp_path_factory, tiny_bert, capsys, bad, at
):
    tmp = tmp_path_factory.mktemp("fuzz-adapt")
    lines = [json.dumps({"text": f"the photo of a {i} can"}) for i in range(50)]
    lines.insert(at, bad)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    try:
        docs = list(readers.read(str(corpus)))
    except UserError:
        docs = None
    if docs is not None:
        return  # this line happened to be readable (e.g. an object with an empty "text")
    path = write_config(tmp, tiny_bert, corpus, data={"text_field": "text"})
    assert main(["adapt", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{corpus}:" in err and "Traceback" not in err
    assert not (tmp / "run").exists()


def test_a_config_that_is_not_utf8_or_not_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert main(["adapt", str(bad)]) == 2
    assert f"{bad}: cannot read the config" in capsys.readouterr().err
    bad.write_text("train: [unclosed\n")
    assert main(["adapt", str(bad)]) == 2
    assert f"{bad}: line 2, column 1: invalid YAML" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["adapt", str(empty)]) == 2
    assert "model.name_or_path" in capsys.readouterr().err
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump({**BASE, "train": {"max_steps": 0}}))
    assert main(["adapt", str(tmp_path / "zero.yaml")]) == 2
    assert "train.max_steps = 0" in capsys.readouterr().err
