"""`taskvec project`: what it says about a fine-tune's tensors that τ cannot hold."""

import json
import re

import pytest

from taskvec.cli import main
from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


def test_project_warns_of_and_records_tensors_beyond_the_base(tmp_path, capsys):
    """A fine-tune with an extra layer: its 12 new tensors are left out of τ, said once and listed."""
    tok = tiny_tokenizer()
    base = tiny_model("gpt2")
    deeper = tiny_model("gpt2", layers=3)
    deeper.load_state_dict(base.state_dict(), strict=False)
    save_hf(base, tmp_path / "base", tok)
    save_hf(perturbed(deeper, seed=1), tmp_path / "ft", tok)
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                            for p, t in (("the movie", " was wonderful"), ("what is 3 plus 4 ?", " 7"))))
    rc = main(["project", str(tmp_path / "base"), str(tmp_path / "ft"), "--data", str(data), "--output", "logprob",
               "--out", str(tmp_path / "p"), "--controls", "0", "--fd-eps", "0", "--no-figures", "--no-progress"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and re.match(r"taskvec project: warning: .*ft holds 12 tensor\(s\) the base lacks "
                                         r"\(transformer\.h\.2\..*left out of τ \(not projected\).*projection\.json "
                                         r"under alignment\.extra", warned[0])
    assert rc == 0
    extra = json.loads((tmp_path / "p" / "projection.json").read_text())["alignment"]["extra"]
    assert len(extra) == 12 and all(name.startswith("transformer.h.2.") for name in extra)


def test_project_warns_when_the_finetune_lacks_an_in_scope_tensor(tmp_path, capsys):
    """A fine-tune missing one body tensor: τ is partial, and project says so (as vectors does)."""
    import torch

    tok = tiny_tokenizer()
    base = tiny_model("gpt2")
    save_hf(base, tmp_path / "base", tok)
    sd = perturbed(base, seed=2).state_dict()
    sd.pop("transformer.h.1.mlp.c_fc.weight")
    (tmp_path / "ft").mkdir()
    torch.save(sd, tmp_path / "ft" / "partial.pt")
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                            for p, t in (("the movie", " was wonderful"), ("what is 3 plus 4 ?", " 7"))))
    capsys.readouterr()
    rc = main(["project", str(tmp_path / "base"), str(tmp_path / "ft" / "partial.pt"), "--data", str(data),
               "--output", "logprob", "--out", str(tmp_path / "p"), "--controls", "0", "--fd-eps", "0",
               "--no-figures", "--no-progress"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert rc == 0 and len(warned) == 1, warned
    assert "1 tensor in scope missing in" in warned[0] and "transformer.h.1.mlp.c_fc.weight" in warned[0]
