import json
import math
import xml.etree.ElementTree as ET

import pytest

from services.cli.main import main
from services.eval.frontier import Target, canonical_spec, field
from services.eval.plot import Frame

NS = "{http://www.w3.org/2000/svg}"


def _rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _plot(tmp_path, *extra):
    a = _rows(tmp_path / "frontier.jsonl", [
        {"spec": "int:k4v4:g32:gv32:r128", "bits_per_element": 5.0, "delta_ppl": 0.086},
        {"spec": "int:k4v2:g32:gv32:r128", "bits_per_element": 4.0, "delta_ppl": 0.918},
        {"spec": "hf-fp8", "bits_per_element": 8.0, "delta_ppl": 0.214},
    ])
    b = _rows(tmp_path / "candidates.jsonl", [
        {"spec": "int:k4v4:g32:gv64:r64:w8", "bits_per_element": 4.75, "delta_ppl": 0.050,
         "session": {"bf16_2048": {"bytes_per_token": 6997.5}}},
        {"spec": "int:k4v4:g48:gv64:r64:w8", "bits_per_element": 4.583, "delta_ppl": 0.085},
    ])
    out = tmp_path / "f.svg"
    assert main(["eval", "plot-frontier", a, b, "--out", str(out), "--mark", "int4:g32:gv64:r64:w8",
                 "--target", "INT4:4.6:0.10", "--target", "K4V2:3.3:0.3", *extra]) == 0
    return ET.parse(out).getroot()  # well-formed XML


def _of(root, tag, cls):
    return [e for e in root.iter(f"{NS}{tag}") if e.get("class") == cls]


def test_every_row_is_a_labelled_point_and_the_default_is_ringed(tmp_path):
    root = _plot(tmp_path)
    points = _of(root, "circle", "point")
    assert len(points) == 5
    labels = {t.text for t in _of(root, "text", "label")}
    assert labels == {"k4v4:g32:gv32:r128", "k4v2:g32:gv32:r128", "hf-fp8", "k4v4:g48:gv64:r64:w8",
                      "k4v4:g32:gv64:r64:w8 (default)"}
    (ring,) = _of(root, "circle", "mark")
    xy = {(float(c.get("cx")), float(c.get("cy"))) for c in points}
    assert (float(ring.get("cx")), float(ring.get("cy"))) in xy
    assert {t.text for t in _of(root, "text", "legend")} == {"frontier", "candidates"}
    boxes = {(t.get("x"), t.get("y")) for t in _of(root, "text", "label")}
    assert len(boxes) == 5  # no two labels at the same place


def test_points_meeting_a_target_lie_inside_its_region_on_a_log_y_axis(tmp_path):
    root = _plot(tmp_path)
    names = {t.text.removesuffix(" (default)") for t in _of(root, "text", "label")}
    rows = {"k4v4:g32:gv32:r128": (5.0, 0.086), "k4v2:g32:gv32:r128": (4.0, 0.918), "hf-fp8": (8.0, 0.214),
                  "k4v4:g32:gv64:r64:w8": (4.75, 0.050), "k4v4:g48:gv64:r64:w8": (4.583, 0.085)}
    assert names == set(rows)
    points = sorted((float(c.get("cx")), float(c.get("cy"))) for c in _of(root, "circle", "point"))
    by_x = dict(zip(sorted(rows, key=lambda k: rows[k][0]), points))  # x are distinct
    int4, k4v2 = _of(root, "rect", "target")
    x0, top = float(int4.get("x")), float(int4.get("y"))
    right, bottom = x0 + float(int4.get("width")), top + float(int4.get("height"))

    def inside(name):
        cx, cy = by_x[name]
        return x0 <= cx <= right and top <= cy <= bottom

    assert inside("k4v4:g48:gv64:r64:w8")  # 4.583 bits at +0.085: meets INT4 <= 4.6 at <= 0.10
    assert not inside("k4v4:g32:gv64:r64:w8") and not inside("k4v4:g32:gv32:r128") and not inside("hf-fp8")
    assert float(k4v2.get("width")) < float(int4.get("width")) and float(k4v2.get("y")) < top  # 3.3 < 4.6, 0.3 > 0.1
    # log y: equal ratios are equal distances; a larger delta is higher up
    (_, y_fp8), (_, y_k4v2), (_, y_int4) = by_x["hf-fp8"], by_x["k4v2:g32:gv32:r128"], by_x["k4v4:g32:gv32:r128"]
    assert y_k4v2 < y_fp8 < y_int4
    frame = Frame(2.0, 9.0, 0.01, 10.0, log_y=True)
    assert frame.sy(0.1) - frame.sy(1.0) == pytest.approx(frame.sy(0.01) - frame.sy(0.1))
    assert [t.text for t in _of(root, "text", "target")] == ["INT4 target: ≤ 4.6, ≤ 0.1", "K4V2 target: ≤ 3.3, ≤ 0.3"]


def test_a_dotted_field_keeps_only_rows_that_have_it(tmp_path):
    root = _plot(tmp_path, "--x", "session.bf16_2048.bytes_per_token", "--linear-y")
    assert len(_of(root, "circle", "point")) == 1
    assert field({"a": {"b": 2}}, "a.b") == 2.0 and field({"a": 1}, "a.b") is None


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="NAME:X:Y"):
        Target.parse("INT4:4.6")
    with pytest.raises(ValueError, match="y > 0"):
        Frame.around([(1.0, 0.0), (2.0, 1.0)], log_y=True)
    assert canonical_spec("int4:g32:gv64:r64:w8") == "int:k4v4:g32:gv64:r64:w8"
    assert canonical_spec("hf-fp8") == "hf-fp8"
    assert math.isclose(Target.parse("K2V2:2.6:1.5").y, 1.5)
