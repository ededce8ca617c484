"""The report: its sections in their registered order, each absent when its inputs are, and the
terminal summary from metrics.json."""

from __future__ import annotations

from squeezer.report import SECTIONS, section, text_summary, text_table, write_report


def test_sections_render_in_order_and_skip_what_is_absent(tmp_path):
    (tmp_path / "manifest.json").write_text('{"tool": "squeezer", "model": "zoo:x"}')
    html, md = write_report(tmp_path)
    text = md.read_text()
    assert "## Run" in text and "## Summary" not in text and "## Hessian spectrum" not in text
    orders = [o for o, _, _ in SECTIONS]
    assert orders == sorted(orders)
    titles = [t for _, t, _ in SECTIONS]
    assert titles[:2] == ["Summary", "Variants"] and titles.index("Layers") < titles.index("Run")


def test_a_registered_section_appears(tmp_path):
    @section("Extra", 95)
    def _extra(run):
        return "extra text", "<p>extra text</p>"

    try:
        (tmp_path / "manifest.json").write_text('{"tool": "squeezer"}')
        html, md = write_report(tmp_path)
        assert md.read_text().rstrip().endswith("extra text")
        assert "<p>extra text</p>" in html.read_text()
    finally:
        SECTIONS[:] = [s for s in SECTIONS if s[1] != "Extra"]


def test_text_table_and_summary():
    t = text_table([["a", "1.5"], ["bb", "10"]], ["name", "x"])
    assert t.splitlines() == ["name  x", "----  ---", "a     1.5", "bb     10"]
    m = {
        "metric_name": "top1",
        "variants": [{"name": "FP32", "metric": 99.1, "size_bytes": 2.9e5, "avg_bits": 32.0}],
        "layers": [{"params": 900}],
        "float_layers": {"gru": {"type": "GRU", "weights": 100}},
    }
    s = text_summary(m)
    assert "FP32" in s and "290 kB" in s and "10% of the weights stay in float" in s
