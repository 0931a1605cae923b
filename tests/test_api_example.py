"""The README's "Python API" example, run exactly as written (read from README.md) on tiny real models saved
under the names it uses, so the README cannot drift from the library."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tiny import PROBE_PAIRS, perturbed, save_hf, tiny_model, tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- python-api-example -->"

PROBES = PROBE_PAIRS


def readme_example() -> str:
    text = README.read_text()
    assert text.count(MARKER) == 1, f"README.md must hold exactly one {MARKER}"
    m = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert m, f"no ```python block right after {MARKER} in README.md"
    return m.group(1)


def test_readme_example_is_short():
    lines = [ln for ln in readme_example().splitlines() if ln.strip()]
    assert 10 <= len(lines) <= 16


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer()
    base = tiny_model("gpt2", seed=0)
    save_hf(base, "base", tok)
    save_hf(perturbed(base, scale=1e-2, seed=41), "ft_a", tok)
    save_hf(perturbed(base, scale=1e-2, seed=42), "ft_b", tok)
    Path("probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES))

    ns: dict = {}
    exec(compile(readme_example(), str(README), "exec"), ns)  # noqa: S102 — our own README, run as documented

    out = capsys.readouterr().out
    assert "['a', 'b']" in out
    assert ns["stats"].names == ["a", "b"] and ns["stats"].cosine().shape == (2, 2)
    assert abs(ns["stats"].cosine()[0, 1] - ns["tau_a"].cosine(ns["tau_b"])) < 1e-6
    for folder in ("base_plus_tau", "merged"):
        assert (tmp_path / folder / "model.safetensors").is_file() and (tmp_path / folder / "config.json").is_file()
    record = json.loads((tmp_path / "merged" / "taskvec_merge.json").read_text())
    assert record["method"] == "ties" and record["densities"] == [0.3, 0.3]
    assert ns["kernel"].n == len(PROBES) and np.all(np.isfinite(ns["kernel"].eigenvalues))
    assert ns["theory"]["early_stopping"]["T_hat"] is not None


@pytest.mark.parametrize("line", ["## Python API", MARKER])
def test_readme_keeps_setup_commands_first(line):
    text = README.read_text()
    first = text.index("```bash")
    assert first < text.index(line)
