"""The documents a newcomer reads: a short README whose test command is CI's, a docs site whose
every page is in its navigation, and generated pages that cannot drift from the schema."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from ecoadapt.cli import CONFIG_PAGE, SUMMARY_PAGE, keys_markdown

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def test_the_readme_is_short_and_its_test_command_is_cis():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme  # exactly the command a newcomer runs
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target


def test_every_docs_page_is_in_the_navigation_and_every_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = {next(iter(entry.values())) for entry in config["nav"]}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav == pages, (nav - pages, pages - nav)
    assert config["strict"] is True


def test_the_configuration_and_summary_pages_are_what_the_schema_generates():
    from ecoadapt.config import all_keys
    from ecoadapt.results.summary import reference

    # Regenerate with: ecoadapt keys --markdown > docs/configuration.md (and --summary, docs/summary.md)
    assert (ROOT / "docs" / "configuration.md").read_text() == keys_markdown(all_keys(), *CONFIG_PAGE)
    summary = keys_markdown(reference(), *SUMMARY_PAGE, defaults=False)
    assert (ROOT / "docs" / "summary.md").read_text() == summary


def test_every_public_function_and_class_of_the_api_has_a_docstring():
    import inspect

    import ecoadapt

    for name in ecoadapt.__all__:
        obj = getattr(ecoadapt, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), name


def test_benchmarks_opens_with_the_headline_table_generated_from_the_raw_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline", ROOT / "bench" / "headline.py")
    assert spec is not None and spec.loader is not None
    headline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = headline  # its dataclass looks its module up there
    spec.loader.exec_module(headline)
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert headline.in_benchmarks(text) == headline.table()  # regenerate: python bench/headline.py --write
    assert text[: text.index(headline.START)].count("\n") < 60
    assert headline.in_benchmarks((ROOT / "README.md").read_text()) == headline.table()  # and the README's


def test_the_task_metrics_come_from_one_table():
    """task.metric's values, the scores the task computes and the verdict's floors are the table's."""
    import typing

    import torch

    from ecoadapt.config import TaskConfig
    from ecoadapt.config.task_metrics import METRICS
    from ecoadapt.task import stats
    from ecoadapt.task.metrics import classification

    allowed = typing.get_args(typing.get_type_hints(TaskConfig)["metric"])
    assert list(allowed) == list(METRICS)
    scores = classification(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2)
    assert set(scores) == set(METRICS)
    counts = {"a": 3, "b": 1}  # always predicting "a": accuracy 0.75, F1 of "a" 6/7, of "b" 0
    assert stats.trivial_score("accuracy", counts) == 0.75 == stats.trivial_score("micro_f1", counts)
    assert stats.trivial_score("macro_f1", counts) == pytest.approx((6 / 7) / 2)


def test_the_precision_modes_come_from_one_table():
    import typing

    from ecoadapt.config import RunConfig
    from ecoadapt.config.precision_modes import AUTO, MODES
    from ecoadapt.forecast import devices
    from ecoadapt.model import precision

    allowed = typing.get_args(typing.get_type_hints(type(RunConfig().precision))["mode"])
    assert list(allowed) == [*MODES, AUTO]  # the config's Literal lists the table's rows, in order
    computes = {m.compute for m in MODES.values()}
    assert computes <= set(devices.DEVICES["H100"].peaks)  # every mode's compute dtype has a peak to plan at
    assert set(precision.AUTOCAST_DTYPES) == {name for name, m in MODES.items() if m.autocast} == {"fp16", "bf16"}
    assert [name for name, m in MODES.items() if m.loss_scaling] == ["fp16"]


def test_the_meters_come_from_one_table():
    import typing

    from ecoadapt.config import RunConfig
    from ecoadapt.config.measure import ENERGY_CHOICES, MEASURED_METERS
    from ecoadapt.measure import meters

    allowed = typing.get_args(typing.get_type_hints(type(RunConfig().measure))["energy"])
    assert allowed == ENERGY_CHOICES
    assert tuple(meters.measured_meters(None, Path("/nonexistent"))) == MEASURED_METERS
