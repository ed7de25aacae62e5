"""Model table: parameters per stage and block, forward FLOPs and activation shapes of any model config.

    python scripts/model_table.py model=resnet50 data=imagenet2012
    python scripts/model_table.py model=resnet20           # at the default data's size (digits, 28x28x1)
    python scripts/model_table.py runs/gpt2                # a run directory's model, e.g. an imported one

The model is built with `nnx.eval_shape` and its forward pass compiled from abstract inputs (batch 1, eval
mode), so nothing is allocated and no data need be present: only the data config's sizes are read. FLOPs come
from XLA's cost analysis of the compiled computation. The table is printed and written as JSON to the run
directory (outputs/model_table/MODEL-DATA unless `hydra.run.dir=` says otherwise).
"""

import json
import logging
import math
import sys
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
from flax import nnx
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from models.resnet import BasicBlock, Bottleneck, ResNet
from train import targets
from train.flops import compiled_flops
from train.config import check_group_choices

KINDS = ("attention", "feed-forward", "embedding", "norm", "other")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" on every CPU run

# ---- Building and compiling without allocating ----


def abstract_model(model_cfg: DictConfig) -> tuple[nnx.Module, list[str]]:
    """The model of `model_cfg` with ShapeDtypeStruct leaves, in eval mode, and its attribute names in definition order.

    (eval_shape returns the attributes sorted; the order in which the constructor set them reads like the model.)
    """
    names: list[str] = []

    def build() -> nnx.Module:
        model = targets.instantiate(model_cfg, rngs=nnx.Rngs(params=0, dropout=1))
        names.extend(vars(model))
        return model

    model = nnx.eval_shape(build)
    model.eval()
    return model, names


def example_inputs(data_cfg: DictConfig, model_cfg: DictConfig | None = None) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract batch-1 model inputs for the data config's task and sizes.

    A language model whose config fixes its own vocabulary and positions (gpt2_small, mamba_130m) is fed
    tokens at its full length whatever the data config, so `model_table.py model=gpt2_small` needs no `data=`.
    """
    if model_cfg is not None and data_cfg.task != "next_token" and "vocab_size" in model_cfg \
            and "src_vocab_size" not in model_cfg and not OmegaConf.is_interpolation(model_cfg, "vocab_size"):
        return (jax.ShapeDtypeStruct((1, model_cfg.get("max_len", 1024)), jnp.int32),)
    if data_cfg.task == "classify":
        return (jax.ShapeDtypeStruct((1, data_cfg.image_size, data_cfg.image_size, data_cfg.channels), jnp.float32),)
    if data_cfg.task == "next_token":
        return (jax.ShapeDtypeStruct((1, data_cfg.seq_len), jnp.int32),)
    return (jax.ShapeDtypeStruct((1, data_cfg.src_len), jnp.int32),
            jax.ShapeDtypeStruct((1, data_cfg.seq_len), jnp.int32))


def forward_flops(model: nnx.Module, inputs: tuple[jax.ShapeDtypeStruct, ...]) -> float:
    """FLOPs of one compiled forward pass by XLA's cost analysis (a multiply-add counts 2), archlab's CPU
    convolutions included (train/flops.py)."""
    graphdef, state = nnx.split(model)
    return compiled_flops(lambda s, *xs: nnx.merge(graphdef, s)(*xs), state, *inputs)


def module_outputs(model: nnx.Module, inputs: tuple[jax.ShapeDtypeStruct, ...]) -> dict[tuple, list[tuple]]:
    """Output shapes of every method call of every submodule, keyed by (module path..., method name)."""
    graphdef, state = nnx.split(model)

    def forward(s, *xs):
        return nnx.capture(nnx.merge(graphdef, s), nnx.Intermediate, method_outputs=nnx.Intermediate)(*xs)[1]

    captured = jax.eval_shape(forward, state, *inputs)
    return {
        path: [leaf.shape for leaf in jax.tree.leaves(variable.get_value())]
        for path, variable in nnx.to_flat_state(captured)
    }


# ---- Counting ----


def parameter_tree(model: nnx.Module, order: list[str] = ()) -> dict:
    """Nested dict of parameter counts by module path (leaves: parameter sizes), top level in `order` first."""
    tree: dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = variable.get_value().size
    return {key: tree[key] for key in [*(k for k in order if k in tree), *(k for k in tree if k not in order)]}


def count(tree: dict | int) -> int:
    """Total parameters under a parameter_tree node."""
    return tree if isinstance(tree, int) else sum(count(v) for v in tree.values())


def per_example(shape: tuple) -> list[int]:
    """A batch-1 output shape without its batch dimension (outputs computed without one, e.g. positions, kept)."""
    return list(shape[1:] if shape and shape[0] == 1 else shape)


def is_list(node: dict | int) -> bool:
    """Whether a parameter_tree node is an nnx.List (stages, blocks): integer keys."""
    return isinstance(node, dict) and bool(node) and all(isinstance(k, int) for k in node)


def call_key(node: dict | int, path: tuple) -> tuple:
    """The captured-output key of the module at `path`; a list's output is its last item's (they run in sequence)."""
    while is_list(node):
        last = max(node)
        path, node = path + (last,), node[last]
    return path + ("__call__",)


def table_rows(tree: dict, outputs: dict[tuple, list[tuple]], prefix: tuple = ()) -> list[dict]:
    """A row per top-level child, expanding lists (stages, blocks) item by item, with each row's output shapes."""
    rows = []
    for key, node in tree.items():
        path = prefix + (key,)
        shapes = outputs.get(call_key(node, path), [])
        rows.append({"name": ".".join(map(str, path)), "depth": len(path) - 1, "params": count(node),
                     "output": [per_example(s) for s in shapes]})
        if is_list(node):
            rows += table_rows(node, outputs, path)
    return rows


def parameter_kind(path: tuple) -> str:
    """Kind of a parameter by the naming convention: `attn`, `mlp`, `*embed*` (or `*token*`), `norm*`/`ln*` names."""
    names = [str(k) for k in path[:-1]]
    if any("attn" in n for n in names):
        return "attention"
    if any(n.startswith("mlp") for n in names):
        return "feed-forward"
    if any("embed" in str(k) or "token" in str(k) for k in path):
        return "embedding"
    if names and names[-1].startswith(("norm", "ln")):
        return "norm"
    return "other"


def parameters_by_kind(model: nnx.Module) -> dict[str, int]:
    """Parameters split into attention / feed-forward / embedding / norm / other."""
    kinds = dict.fromkeys(KINDS, 0)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        kinds[parameter_kind(path)] += variable.get_value().size
    return kinds


def conv_macs(model: nnx.Module, outputs: dict[tuple, list[tuple]]) -> int | None:
    """Multiply-adds of the Conv and Linear layers, padding included (torchvision's 4.09 GMACs for ResNet-50).

    None for models without padded convolutions, where XLA's count already is the usual one.
    """
    modules = list(nnx.iter_modules(model))
    if not any(isinstance(m, nnx.Conv) and m.padding != "VALID" for _, m in modules):
        return None
    macs = 0
    for path, module in modules:
        if isinstance(module, (nnx.Conv, nnx.Linear)):
            groups = module.feature_group_count if isinstance(module, nnx.Conv) else 1
            per_position = module.kernel.get_value().size // groups
            macs += sum(per_position * math.prod(shape[:-1]) for shape in outputs.get((*path, "__call__"), []))
    return macs


def bottleneck_comparison(dtype: str) -> dict[str, dict[str, float]]:
    """The chapter's bottleneck (256 -> 64 -> 64 -> 256) beside a plain block of two 3x3 convs at 256 channels.

    Both at ResNet-50's first stage (56 x 56), identity shortcut, BatchNorm included.
    """
    blocks = {"bottleneck 256-64-64-256": lambda r: Bottleneck(256, 64, 1, dtype=dtype, rngs=r),
              "plain 2 x 3x3 conv, 256": lambda r: BasicBlock(256, 256, 1, dtype=dtype, rngs=r)}
    x = jax.ShapeDtypeStruct((1, 56, 56, 256), jnp.float32)
    out = {}
    for name, make in blocks.items():
        block = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
        block.eval()
        out[name] = {"params": count(parameter_tree(block)), "flops": forward_flops(block, (x,))}
    return out


# ---- Report ----


def model_table(cfg: DictConfig, names: tuple[str, str] | None = None) -> dict:
    """Everything the table shows, as JSON-ready data; `names` (model, data) default to the Hydra choices."""
    if names is None:
        names = (HydraConfig.get().runtime.choices.model, HydraConfig.get().runtime.choices.data)
    model, order = abstract_model(cfg.model)
    inputs = example_inputs(cfg.data, cfg.model)
    outputs = module_outputs(model, inputs)
    tree = parameter_tree(model, order)
    table = {
        "model": names[0],
        "data": names[1],
        "inputs": [list(x.shape) for x in inputs],
        "rows": table_rows(tree, outputs),
        "parameters_by_kind": parameters_by_kind(model),
        "flops_per_example": forward_flops(model, inputs),
        "conv_macs_per_example": conv_macs(model, outputs),
        "total_parameters": count(tree),
    }
    if ("features",) in outputs:
        table["features"] = [per_example(s) for s in outputs[("features",)]]
    if isinstance(model, ResNet) and isinstance(model.stages[0][0], Bottleneck):
        table["bottleneck_vs_plain"] = bottleneck_comparison(cfg.model.dtype)
    return table


def format_table(table: dict) -> str:
    """The table as text, ending with the line `total parameters: N`."""
    lines = [f"model={table['model']} data={table['data']}  input {' + '.join(map(str, table['inputs']))}  "
             "(output shapes per example)", f"{'module':<32} {'params':>14}  output"]
    for row in table["rows"]:
        shapes = ", ".join(" x ".join(map(str, s)) for s in row["output"])
        lines.append(f"{'  ' * row['depth'] + row['name']:<32} {row['params']:>14,}  {shapes}")
    total = table["total_parameters"]
    lines.append("parameters by kind: " + ", ".join(
        f"{k} {n:,} ({n / total:.1%})" for k, n in table["parameters_by_kind"].items() if n))
    if "features" in table:
        lines.append("features before pooling / classification: "
                     + ", ".join(" x ".join(map(str, s)) for s in table["features"]))
    flops = table["flops_per_example"]
    lines.append(f"forward FLOPs per example (XLA cost analysis): {flops / 1e9:,.3f} G = {flops / 2e9:,.3f} GMACs")
    if table["conv_macs_per_example"] is not None:
        lines.append(f"  XLA skips multiplications by convolution padding; conv + linear multiply-adds with padding "
                     f"(the usual published count): {table['conv_macs_per_example'] / 1e9:,.3f} GMACs")
    if "bottleneck_vs_plain" in table:
        lines.append("bottleneck vs plain block at 56 x 56 (identity shortcut, BatchNorm included):")
        for name, c in table["bottleneck_vs_plain"].items():
            lines.append(f"  {name:<26} {c['params']:>12,} params {c['flops'] / 1e9:>8.3f} GFLOPs")
        bottleneck, plain = table["bottleneck_vs_plain"].values()
        lines.append(f"  saving: {plain['params'] / bottleneck['params']:.1f}x fewer parameters, "
                     f"{plain['flops'] / bottleneck['flops']:.1f}x fewer FLOPs")
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Print the model table of the composed config and write it as JSON to the run directory."""
    try:
        table = model_table(cfg)
    except InstantiationException as e:  # a shape contradiction in the config, named in one line by the model
        sys.exit(f"error: {e.__cause__ or e}")
    except ValueError as e:  # a target that is not allowed
        sys.exit(f"error: {e}")
    path = Path(HydraConfig.get().runtime.output_dir) / "model_table.json"
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}")
    print(format_table(table))


def describe_run(run_dir: Path) -> None:
    """The table of a run directory's model (a training run, or one imported by scripts/convert.py)."""
    from train.pretrained import run_config

    cfg = run_config(run_dir)
    table = model_table(cfg, (f"{cfg.model._target_} of {run_dir}", cfg.data._target_))
    (run_dir / "model_table.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {run_dir / 'model_table.json'}")
    print(format_table(table))


if __name__ == "__main__":
    if len(sys.argv) == 2 and Path(sys.argv[1]).is_dir():  # python scripts/model_table.py RUN_DIR
        try:
            describe_run(Path(sys.argv[1]))
        except ValueError as e:
            sys.exit(f"error: {e}")
        sys.exit()
    try:
        check_group_choices(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
        # Its own run directory, so that the table never overwrites a training run's .hydra/ config.
        sys.argv.append("hydra.run.dir=outputs/model_table/"
                        "${hydra:runtime.choices.model}-${hydra:runtime.choices.data}")
    main()
