import json
import xml.etree.ElementTree as ET

from services.cli.main import main


def test_plot_writes_one_polyline_per_series(tmp_path):
    a, b = tmp_path / "int4.jsonl", tmp_path / "int2.jsonl"
    a.write_text("\n".join(json.dumps({"evicted_fraction": x, "delta_ppl": y}) for x, y in [(0.4, 1.0), (0, 0.1)]))
    b.write_text(json.dumps({"evicted_fraction": 0.2, "delta_ppl": 3.5}) + "\n")
    out = tmp_path / "p.svg"
    assert main(["eval", "plot", str(a), str(b), "--out", str(out), "--title", "eviction"]) == 0
    root = ET.parse(out).getroot()  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2 and len(root.findall(f"{ns}circle")) == 3
    first = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    assert first[0][0] < first[1][0] and first[0][1] > first[1][1]  # sorted by x; larger y is higher up
    assert any(t.text == "int2" for t in root.findall(f"{ns}text"))
