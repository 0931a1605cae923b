"""Real checkpoint files for the checkpoint/vector tests: tiny models saved in every format.

`make_collection(root, arch)` writes a base and fine-tunes as an HF safetensors folder, a sharded
bf16 folder, a .bin folder, a bare .pt state dict and (for gpt2/llama) a PEFT LoRA adapter with
non-zero B, and returns the paths plus the full state dicts for direct comparisons.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import perturbed, save_hf, tiny_model, tiny_tokenizer

LORA_TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"],
                "gpt_neox": ["query_key_value"], "bert": ["query", "value"]}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_lora(base_model, folder: Path, arch: str, seed: int = 3, **cfg):
    """A real PEFT LoRA adapter (random non-zero B) saved in `folder`; returns (ΔW by base name, config)."""
    import copy

    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], lora_dropout=0.0)
    if arch == "gpt2":
        kw.update(fan_in_fan_out=True, rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_fc": 16})
    kw.update(cfg)
    base_copy = copy.deepcopy(base_model)
    before = state(base_copy)
    pm = get_peft_model(base_copy, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)
    merged = pm.merge_and_unload()
    after = state(merged)
    params = {k for k, _ in merged.named_parameters()}  # tied copies (lm_head = embeddings) once
    deltas = {k: after[k] - before[k] for k in before if k in params and not torch.equal(after[k], before[k])}
    return deltas, merged


def make_collection(root: Path, arch: str, n_ft: int = 2, scale: float = 1e-2) -> dict:
    """Base + `n_ft` fine-tunes of a tiny `arch` model in several formats under `root`."""
    root = Path(root)
    tok = tiny_tokenizer(kind="encoder" if arch == "bert" else "causal")
    base = tiny_model(arch, seed=0)
    out = {"arch": arch, "base_model": base, "base_sd": state(base), "base": save_hf(base, root / "base", tok)}
    out["ft"], out["ft_sd"], out["ft_models"] = [], [], []
    for i in range(n_ft):
        ft = perturbed(base, scale=scale * (i + 1), seed=10 + i)
        out["ft_models"].append(ft)
        out["ft_sd"].append(state(ft))
        out["ft"].append(save_hf(ft, root / f"ft{i}", tok))
    # the first fine-tune in other formats
    ft0 = out["ft_models"][0]
    import copy

    out["ft0_bf16_sharded"] = save_hf(copy.deepcopy(ft0).to(torch.bfloat16), root / "ft0_bf16", tok,
                                      max_shard_size="20KB")
    out["ft0_bf16_sd"] = {k: v.to(torch.bfloat16) for k, v in out["ft_sd"][0].items()}
    out["ft0_bin"] = save_bin(ft0, root / "ft0_bin", n_shards=2)
    pt = root / "ft0.pt"
    torch.save(out["ft_sd"][0], pt)
    out["ft0_pt"] = pt
    return out


def save_bin(model, folder: Path, n_shards: int = 1) -> Path:
    """The legacy PyTorch layout: config.json + pytorch_model.bin (or shards + pytorch_model.bin.index.json)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    sd = state(model)
    if n_shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    keys = list(sd)
    wmap = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = keys[i::n_shards]
        torch.save({k: sd[k] for k in part}, folder / name)
        wmap.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return folder
