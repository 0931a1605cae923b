import torch

from tiny import ARCHS, tiny_model, tiny_tokenizer


def test_tiny_models_run_forward():
    tok = tiny_tokenizer()
    ids = tok(["the movie was wonderful"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 3
    for arch in ARCHS:
        model = tiny_model(arch)
        out = model(input_ids=ids)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        assert torch.isfinite(hidden).all(), arch
