"""The real default demo (all-MiniLM-L6-v2 on four VADER domains), end to end. Minutes: `pytest -m slow`."""

import json
import math

import pytest

from taskvec.cli import main as cli_main


@pytest.mark.slow
def test_default_demo_report_has_every_item(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["tasks"] == ["movies", "tweets", "nyt", "amazon"]
    for t in res["tasks"]:
        th = res["theory"][t]
        best_val = min(p["validation"] for p in th["measured_curve"])
        assert best_val < th["pretrained"]["validation"], t  # fine-tuning helped on every task
        for v in (th["predicted_epochs"], th["measured_best_epoch"], th["kernel_gd"]["test_mse_at_T_hat"],
                  th["kernel_ridge"]["test_mse_gcv"], th["finetune"]["best_epoch_test_mse"], th["sigma"], th["radius"]):
            assert v is not None and math.isfinite(v), t
        assert res["projection"][t]["control"]["cumulative"]
    assert res["rates"]["measured"]["slope"] is not None
    assert res["arithmetic"]["interference"]["spearman_delta"]["rho"] is not None
    assert (tmp_path / "demo" / "index.html").is_file()
    # warm rerun: everything cached
    assert cli_main(["demo", "--out", str(tmp_path / "demo2"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "demo2" / "results.json").read_text()) == res
