"""The chapter's quantitative claims, each measured by code: shapes, counts and cost ratios in a few seconds.

    .venv/bin/python scripts/claims.py                          # every claim: markdown table + outputs/claims/claims.json
    .venv/bin/python scripts/claims.py --claim resnet50         # one claim

Models are built with `nnx.eval_shape` (nothing allocated, so the 6.4B-parameter GPT is counted on a laptop);
FLOPs come from XLA's cost analysis of the compiled computation. Claims measured by training runs (Selective
Copying) or by timing sweeps (attention vs Mamba) have their own scripts; the README table links them.
"""

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from models.gpt import GPT
from models.lenet import LeNet
from models.resnet import BasicBlock, Bottleneck
from scripts.model_table import abstract_model, conv_macs, example_inputs, module_outputs, parameters_by_kind
from train.config import compose

COMMAND = ".venv/bin/python scripts/claims.py --claim {}"


def num_params(model: nnx.Module) -> int:
    """Parameters of a (possibly abstract) model."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_call(model: nnx.Module, method: str, *inputs: jax.ShapeDtypeStruct):
    """Output shapes of `model.method(*inputs)` for an abstract model, without computing anything."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, *xs: getattr(nnx.merge(graphdef, s), method)(*xs), state, *inputs)


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs of `fn(*args)` by XLA's cost analysis (a multiply-add counts 2)."""
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


# ---- Claims ----


def lenet_features() -> dict:
    """LeNet: conv5x5 -> pool -> conv5x5 -> pool turns a 28x28 image into a 256-value feature vector."""
    lenet = nnx.eval_shape(lambda: LeNet(1, 28, 10, rngs=nnx.Rngs(0)))
    features = abstract_call(lenet, "features", jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    return {"claim": "LeNet-like: a 28x28 input becomes a 256-value feature vector",
            "measured": f"28 x 28 x 1 -> {features.shape[1]} features (16 x 4 x 4)",
            "values": {"features": features.shape[1]}}


def mlp_hidden_layers() -> dict:
    """The MLP's hidden layers are its linear layers but the output one (model=mlp as configured)."""
    cfg = compose(["model=mlp"])
    mlp, _ = abstract_model(cfg.model)
    linear = sum(isinstance(m, nnx.Linear) for _, m in nnx.iter_modules(mlp))
    return {"claim": "MLP: hidden layers = linear layers excluding the output layer",
            "measured": f"model=mlp (hidden {list(cfg.model.hidden)}): {linear} linear layers, {linear - 1} hidden",
            "values": {"linear_layers": linear, "hidden_layers": linear - 1, "configured": len(cfg.model.hidden)}}


def conv_cost() -> dict:
    """A 3x3 convolution's parameters and FLOPs at C_in = C_out = 64 and at 128 (both doubled)."""
    out = {}
    for c in (64, 128):
        conv = nnx.Conv(c, c, (3, 3), padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(conv)
        x = jnp.zeros((1, 32, 32, c), jnp.float32)
        out[c] = {"params": num_params(conv),
                  "flops": compiled_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)}
    params_ratio = out[128]["params"] / out[64]["params"]
    flops_ratio = out[128]["flops"] / out[64]["flops"]
    return {"claim": "convolution cost grows as C_in x C_out (doubling both: 4x parameters and FLOPs)",
            "measured": f"3x3 conv on 32 x 32, 64->64 vs 128->128 channels: {params_ratio:.2f}x parameters "
                        f"({out[64]['params']:,} -> {out[128]['params']:,}), {flops_ratio:.2f}x FLOPs (XLA)",
            "values": {"params_ratio": params_ratio, "flops_ratio": flops_ratio, **{str(c): v for c, v in out.items()}}}


def bottleneck() -> dict:
    """ResNet's bottleneck (256 -> 64 -> 64 -> 256) against two 3x3 convolutions at 256 channels, at 56 x 56."""
    x = jax.ShapeDtypeStruct((1, 56, 56, 256), jnp.float32)
    out = {}
    for name, make in {"bottleneck": lambda r: Bottleneck(256, 64, 1, dtype="float32", rngs=r),
                       "plain": lambda r: BasicBlock(256, 256, 1, dtype="float32", rngs=r)}.items():
        block = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
        block.eval()
        out[name] = {"params": num_params(block), "macs": conv_macs(block, module_outputs(block, (x,)))}
    params_ratio = out["plain"]["params"] / out["bottleneck"]["params"]
    macs_ratio = out["plain"]["macs"] / out["bottleneck"]["macs"]
    return {"claim": "bottleneck block at 256 channels vs two 3x3 convolutions",
            "measured": f"{out['bottleneck']['params']:,} vs {out['plain']['params']:,} parameters "
                        f"({params_ratio:.1f}x fewer), {out['bottleneck']['macs'] / 1e6:,.0f}M vs "
                        f"{out['plain']['macs'] / 1e6:,.0f}M MACs at 56 x 56 ({macs_ratio:.1f}x fewer)",
            "values": {"params_ratio": params_ratio, "macs_ratio": macs_ratio, **out}}


def resnet50() -> dict:
    """ResNet-50 at 224 x 224: the feature map before pooling, parameters and multiply-adds per image."""
    cfg = compose(["model=resnet50", "data=imagenet2012"])
    model, _ = abstract_model(cfg.model)
    outputs = module_outputs(model, example_inputs(cfg.data, cfg.model))
    (features,) = outputs[("features",)]
    params, macs = num_params(model), conv_macs(model, outputs)
    return {"claim": "ResNet-50: 2048 x 7 x 7 before pooling, ~25.6M parameters, ~4.1 GMACs per 224x224 image",
            "measured": f"features {' x '.join(map(str, features[1:]))} (H x W x C), {params:,} parameters, "
                        f"{macs / 1e9:.2f} GMACs (conv + linear, padding included)",
            "values": {"features": list(features[1:]), "params": params, "gmacs": macs / 1e9}}


def gpt_model_x() -> dict:
    """GPT "Model-X" (d_model 4096, 32 layers): parameters outside the embeddings, split attention / feed-forward."""
    cfg = compose(["model=gpt_model_x"])
    model, _ = abstract_model(cfg.model)
    kinds = parameters_by_kind(model)
    blocks = kinds["attention"] + kinds["feed-forward"] + kinds["norm"] + kinds["other"]
    attn, ff = kinds["attention"] / blocks, kinds["feed-forward"] / blocks
    return {"claim": 'GPT "Model-X" (d_model 4096, 32 layers): ~6.4B parameters outside the embeddings, '
                     "1/3 attention, 2/3 feed-forward",
            "measured": f"{blocks / 1e9:.2f}B outside the embeddings ({kinds['embedding'] / 1e6:.0f}M embedding): "
                        f"attention {attn:.3f}, feed-forward {ff:.3f}, norms {kinds['norm'] / blocks:.1e}",
            "values": {"non_embedding": blocks, "attention_share": attn, "feed_forward_share": ff, **kinds}}


def teacher_forcing(batch: int = 4, length: int = 32) -> dict:
    """A GPT's one forward call scores every position (teacher forcing); generation needs one call per token."""
    model = GPT(vocab_size=64, max_len=length, num_layers=2, d_model=64, num_heads=4, rngs=nnx.Rngs(0))
    model.eval()
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, 64)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    forward = nnx.jit(lambda m, x: m(x))
    logits = forward(model, inputs)  # (B, T) -> (B, T, V): every position in one call
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]  # (B, T) per position

    decode = nnx.jit(lambda m, x, caches: m(x, caches))
    caches, stepwise = model.init_cache(batch, length), []
    for t in range(length):  # generation: one token per call, each call sees only the tokens before it
        step_logits, caches = decode(model, inputs[:, t:t + 1], caches)
        stepwise.append(step_logits[:, 0])
    stepwise = jnp.stack(stepwise, 1)  # T x (B, V) -> (B, T, V)
    diff = float(jnp.max(jnp.abs(stepwise - logits)))
    return {"claim": "teacher forcing: all positions trained in one parallel pass; generation one token at a time",
            "measured": f"1 forward call -> logits {tuple(logits.shape)} and a loss at each of {loss.shape[1]} "
                        f"positions; generation: {length} calls of 1 token, same logits (largest difference {diff:.1e})",
            "values": {"train_calls": 1, "positions_scored": int(loss.shape[1]), "generation_calls": length,
                       "logits_shape": list(logits.shape), "max_abs_diff": diff}}


CLAIMS: dict[str, Callable[[], dict]] = {
    "lenet_features": lenet_features, "mlp_hidden_layers": mlp_hidden_layers, "conv_cost": conv_cost,
    "bottleneck": bottleneck, "resnet50": resnet50, "gpt_model_x": gpt_model_x, "teacher_forcing": teacher_forcing,
}


# ---- Report ----


def measure(names: list[str]) -> list[dict]:
    """Run the named claims; each record has its name, claim, command, measured text, values and seconds."""
    records = []
    for name in names:
        start = time.perf_counter()
        record = CLAIMS[name]()
        records.append({"name": name, "command": COMMAND.format(name), **record,
                        "seconds": round(time.perf_counter() - start, 2)})
    return records


def markdown(records: list[dict], date: str, machine: str) -> str:
    """The claims table: claim | command | measured (date, machine)."""
    lines = [f"| claim | command | measured ({date}, {machine}) |", "|---|---|---|"]
    lines += [f"| {r['claim']} | `{r['command']}` | {r['measured']} |" for r in records]
    return "\n".join(lines)


def main() -> None:
    """Measure the claims named on the command line (all by default); print the table, write claims.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim", choices=list(CLAIMS), action="append", help="measure only these (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/claims"), help="folder for claims.json")
    args = parser.parse_args()
    records = measure(args.claim or list(CLAIMS))
    date = datetime.date.today().isoformat()
    device = jax.devices()[0]
    machine = f"{os.cpu_count()}-core CPU" if device.platform == "cpu" else f"{jax.device_count()} x {device.device_kind}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "claims.json"
    path.write_text(json.dumps({"date": date, "machine": machine, "claims": records}, indent=1, default=int) + "\n")
    print(markdown(records, date, machine))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
