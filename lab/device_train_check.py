"""Device run for issue 3: a tiny GDN-2 language model trained a few steps with our op and,
from the same initialisation and data, with FLA's chunk_gdn2 swapped in.

Task: y_t = x_{t-3} on random tokens (vocab 64), which the model can only solve by carrying
tokens through the recurrent state. fp32 parameters (AdamW), fp32 activations into the op.
Usage: python lab/device_train_check.py OUT_DIR [--fla-configs=N]

``--fla-configs=N`` keeps only the first N configs of every Triton autotuner before FLA is
imported: FLA's first fp32 fwd+bwd otherwise compiles and times every config of every kernel,
which outlasted a 250 s device call. The configs change FLA's speed, not the function it computes;
the count is recorded in the JSON.
"""
from __future__ import annotations

import json
import sys

import torch

import gdn2_kernels.ops as ops
from gdn2_kernels.layer import GatedDeltaNet2

out_dir = sys.argv[1]
FLA_CONFIGS = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--fla-configs=")), 0))
dev = torch.device("cuda")
VOCAB, LAG, STEPS = 64, 3, 80


class TinyLM(torch.nn.Module):
    def __init__(self, d: int = 128, layers: int = 2):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.mixers = torch.nn.ModuleList(
            GatedDeltaNet2(hidden_size=d, num_heads=2, head_dim=64, mode="chunk")
            for _ in range(layers))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(h)


def train() -> list[float]:
    torch.manual_seed(0)
    model = TinyLM().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator(device=dev).manual_seed(1)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (8, 256 + LAG), device=dev, generator=gen)
        logits = model(ids[:, LAG:])
        loss = torch.nn.functional.cross_entropy(logits[:, LAG:].reshape(-1, VOCAB),
                                                 ids[:, LAG:-LAG].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 5))
    return losses


result = {"device": torch.cuda.get_device_name(0), "task": f"y_t = x_(t-{LAG}), vocab {VOCAB}",
          "steps": STEPS}
ours = ops.chunk_gdn2
result["ours"] = train()
# Saved before FLA runs: FLA autotunes every new shape on its first call, which can outlast a
# device call's time limit.
json.dump(result, open(f"{out_dir}/train_check.json", "w"), indent=1)
print("ours", result["ours"][::10] + result["ours"][-1:], flush=True)
try:
    if FLA_CONFIGS:
        from triton.runtime import autotuner

        _init = autotuner.Autotuner.__init__

        def _few_configs(self, fn, arg_names, configs, *a, **kw):
            _init(self, fn, arg_names, configs[:FLA_CONFIGS], *a, **kw)

        autotuner.Autotuner.__init__ = _few_configs
        result["fla_autotune_configs_kept"] = FLA_CONFIGS
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2

    ops.chunk_gdn2 = lambda *a, validate_values=True, **kw: fla_chunk_gdn2(*a, **kw)
    result["fla"] = train()
    ops.chunk_gdn2 = ours
    result["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(result["ours"], result["fla"]))
except ImportError as exc:
    result["fla"] = f"unavailable: {exc}"
print(json.dumps({k: (v if not isinstance(v, list) else v[::10] + v[-1:]) for k, v in result.items()}))
json.dump(result, open(f"{out_dir}/train_check.json", "w"), indent=1)
