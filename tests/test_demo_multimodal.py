"""`make demo-multimodal` on a tiny slice (a few hundred charts, a few dozen steps): every stage runs,
the report and its figures are there and consistent, a second run is all up to date, and the
calibration metric has known answers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_multimodal import calibration, main


def test_ece_known_answers():
    p = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0]])
    assert calibration(p, np.array([0, 1]), 10)["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    # a confident, always-right model is calibrated; always-wrong with confidence c has ECE c
    sure = np.tile([1.0, 0, 0, 0], (5, 1))
    assert calibration(sure, np.zeros(5, int))["ece"] == pytest.approx(0.0)
    assert calibration(sure * 0.7 + 0.075, np.ones(5, int))["ece"] == pytest.approx(0.775)
    # binned by the top-class probability into (lo, hi]: 0.4 -> (0.3, 0.4], 0.25 -> (0.2, 0.3]
    c = calibration(np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]), np.array([0, 3]), 10)
    assert c["count"][3] == 1 and c["count"][2] == 1 and sum(c["count"]) == 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    build = tmp_path_factory.mktemp("mm") / "build"
    args = ["--build", str(build), "--charts", "320", "--steps", "60", "--workers", "1"]
    assert main(args) == 0
    return build, args


def test_report_and_figures(demo):
    build, _ = demo
    report = (build / "report.md").read_text(encoding="utf-8")
    res = json.loads((build / "results.json").read_text(encoding="utf-8"))
    assert set(res["evals"]) == {"no-calibration", "calibration-0.2"}
    for name, ev in res["evals"].items():
        n = ev["rows"]
        assert n > 30 and np.array(ev["confusion"]).sum() == n == sum(ev["calibration"]["count"])
        assert ev["accuracy"] == pytest.approx(np.trace(np.array(ev["confusion"])) / n)
        assert 0 <= ev["calibration"]["ece"] <= 1 and len(ev["calibration"]["count"]) == 15
        assert f"{ev['accuracy']:.1%}" in report and f"{ev['calibration']['ece']:.4f}" in report
        assert res["runs"][name]["steps"] == 60
        rows = [json.loads(line) for line in open(res["runs"][name]["metrics"])]
        steps = [r for r in rows if not r.get("eval")]
        assert len(steps) == 60 and all(math.isfinite(r["decision_loss"]) for r in steps)
        assert abs(steps[0]["decision_loss"] - math.log(4)) < 0.3   # untrained: about ln 4
        # the captions' next-token loss falls (the decision head needs a few hundred steps to leave
        # its plateau, more than a test can afford: accuracy is only checked for consistency here)
        assert np.mean([r["lm_loss"] for r in steps[-10:]]) < np.mean([r["lm_loss"] for r in steps[:10]]) - 0.5
    assert res["runs"]["calibration-0.2"]["calibration_loss_weight"] == 0.2
    for fig in ("reliability.png", "loss.png", "charts.png"):
        assert f"]({fig})" in report
        with Image.open(build / fig) as im:
            im.load()
            assert im.width >= 300 and im.height >= 200
            assert np.asarray(im.convert("L")).std() > 10   # not blank
    assert "majority baseline" in report and "| **abstain** |" in report
    assert "AutoModelForCausalLM.from_pretrained" in report


def test_second_run_is_up_to_date_and_force_redoes_later_stages(demo, capsys):
    build, args = demo
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("charts", "tokenizer", "pack", "train (no-calibration)", "evaluate (calibration-0.2)"):
        assert f"[demo-multimodal:{stage}] up to date" in out, out
    assert main(args + ["--force", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "[demo-multimodal:train (calibration-0.2)] up to date" in out
    assert "[demo-multimodal:evaluate] no-calibration: accuracy" in out


def test_a_failed_stage_is_named_and_keeps_the_done_ones(tmp_path, capsys):
    build = tmp_path / "b"
    # a caption tokenizer too small for a byte-level vocabulary fails the tokenizer stage
    assert main(["--build", str(build), "--charts", "20", "--vocab-size", "10", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "stage 'tokenizer' failed" in err
    assert (build / "charts" / "rows.jsonl").exists()
    state = json.loads((build / "stages.json").read_text())
    assert set(state["stages"]) == {"charts"}
