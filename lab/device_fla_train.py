"""Device run for issue 17: a small flash-linear-attention GDN-2 model trained a few steps on FLA's
kernels and, with ``gdn2_kernels.integrations.fla.enable()``, on ours; losses and step times.

The model is FLA's own ``fla.layers.GatedDeltaNet2`` (flash-linear-attention 0.6.0) stacked with
RMSNorm residual blocks, an embedding and a head: the same module objects, weights and data both
ways; only the op behind the layer changes. Task: y_t = x_(t-3) on random tokens (learnable only
through the recurrent state). Each run starts from the same initialisation and data stream.

Usage: python lab/device_fla_train.py OUT_DIR [--steps=N] [--dtype=bf16|fp32]
       [--fla-configs=N]

Writes OUT_DIR/fla_train.json (after each run, so a run cut short keeps the first half):
losses per step, step times (ms, CUDA-synchronised wall time per optimizer step), their medians
after the warm-up steps, and the largest loss difference. ``--fla-configs=N`` keeps only the first
N configs of every Triton autotuner (FLA autotunes every new shape at its first call; the configs
change FLA's speed, not what it computes; recorded in the JSON). Needs fla-core and
flash-linear-attention 0.6.0 (``pip install --no-deps`` of both wheels, plus einops); when
transformers is missing, fla/layers/gdn2.py is loaded without the fla.layers package index
(which imports transformers for other layers).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import types

import torch

ARGS = dict(a.lstrip("-").split("=", 1) for a in sys.argv[2:] if "=" in a)
OUT = sys.argv[1]
STEPS = int(ARGS.get("steps", 30))
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[ARGS.get("dtype", "bf16")]
FLA_CONFIGS = int(ARGS.get("fla-configs", 0))
WARMUP = 3
VOCAB, LAG, B, T, HIDDEN, LAYERS = 256, 3, 4, 1024, 512, 4
dev = torch.device("cuda")

if FLA_CONFIGS:
    from triton.runtime import autotuner

    _init = autotuner.Autotuner.__init__

    def _few_configs(self, fn, arg_names, configs, *a, **kw):
        _init(self, fn, arg_names, configs[:FLA_CONFIGS], *a, **kw)

    autotuner.Autotuner.__init__ = _few_configs


def fla_layer_class():
    try:
        from fla.layers import GatedDeltaNet2
        return GatedDeltaNet2, "fla.layers"
    except ImportError:
        import fla

        pkg = types.ModuleType("fla.layers")
        pkg.__path__ = [fla.__path__[0] + "/layers"]
        sys.modules["fla.layers"] = pkg
        from fla.layers.gdn2 import GatedDeltaNet2
        return GatedDeltaNet2, "fla/layers/gdn2.py (without the fla.layers index)"


class TinyLM(torch.nn.Module):
    def __init__(self, layer_cls):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mixers = torch.nn.ModuleList(
            layer_cls(hidden_size=HIDDEN, head_dim=128, num_heads=4, layer_idx=i)
            for i in range(LAYERS))
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(HIDDEN) for _ in range(LAYERS))
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            o, _, _ = mixer(hidden_states=norm(h))
            h = h + o
        return self.head(h)


def train(layer_cls) -> dict:
    torch.manual_seed(0)
    model = TinyLM(layer_cls).to(dev, DTYPE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    gen = torch.Generator(device=dev).manual_seed(1)
    losses, step_ms = [], []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (B, T + LAG), device=dev, generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids[:, LAG:])
        loss = torch.nn.functional.cross_entropy(logits[:, LAG:].float().reshape(-1, VOCAB),
                                                 ids[:, LAG:-LAG].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        step_ms.append(round((time.perf_counter() - t0) * 1e3, 3))
        losses.append(round(loss.item(), 5))
    return {"losses": losses, "step_ms": step_ms,
            "median_step_ms": statistics.median(step_ms[WARMUP:])}


def main() -> None:
    import fla

    from gdn2_kernels.integrations import fla as integration

    layer_cls, source = fla_layer_class()
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "fla": getattr(fla, "__version__", "?"), "layer": source,
        "task": f"y_t = x_(t-{LAG}), vocab {VOCAB}", "shape": dict(B=B, T=T, hidden=HIDDEN,
                                                                   layers=LAYERS, heads=4,
                                                                   head_dim=128),
        "dtype": str(DTYPE), "steps": STEPS, "warmup_steps_excluded": WARMUP,
        "fla_autotune_configs_kept": FLA_CONFIGS or "all",
    }
    integration.enable()
    result["gdn2_kernels"] = train(layer_cls)
    integration.disable()
    json.dump(result, open(f"{OUT}/fla_train.json", "w"), indent=1)
    print("gdn2_kernels", result["gdn2_kernels"]["losses"][::5],
          result["gdn2_kernels"]["median_step_ms"], flush=True)
    result["fla"] = train(layer_cls)
    ours, theirs = result["gdn2_kernels"], result["fla"]
    result["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(ours["losses"],
                                                                 theirs["losses"]))
    result["speedup_median_step"] = round(theirs["median_step_ms"] / ours["median_step_ms"], 3)
    json.dump(result, open(f"{OUT}/fla_train.json", "w"), indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("gdn2_kernels", "fla")}))
    print("fla", theirs["losses"][::5], theirs["median_step_ms"])


if __name__ == "__main__":
    main()
