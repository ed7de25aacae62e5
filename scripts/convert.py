"""Import published checkpoints (Hugging Face layout) as archlab run directories, and export them back.

    python scripts/convert.py import SRC_DIR RUN_DIR   # config.json + model.safetensors | pytorch_model.bin
    python scripts/convert.py export RUN_DIR OUT_DIR   # config.json + model.safetensors; loads in transformers

Families: GPT-2 (GPT2LMHeadModel), Mamba (MambaForCausalLM and the state-spaces/mamba-* layout), ViT
(ViTForImageClassification), ResNet (ResNetForImageClassification); scripts/interop/ holds a weight map for each.
An imported run directory holds `.hydra/config.yaml` (the archlab model config matching config.json), a
weights-only orbax checkpoint and, for language models, the source's tokenizer.json. Sample from it
(scripts/sample.py RUN_DIR), describe it (scripts/model_table.py RUN_DIR) or fine-tune from it
(python -m train ... trainer.init_from=RUN_DIR). Everything is checked before anything is written, and the
output directory appears complete or not at all.
"""

import argparse
import importlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from scripts.interop import flat_state
from train import config as _config
from train import pretrained, targets
from train.checkpoint import Checkpoints

log = logging.getLogger("convert")
# archlab model -> the scripts/interop module mapping its weights
FAMILIES = {"models.gpt.GPT": "gpt2", "models.mamba.MambaLM": "mamba", "models.vit.ViT": "vit",
            "models.resnet.ResNet": "resnet"}
TOKENIZER = "tokenizer.json"


# ---- Reading a Hugging Face directory ----


def family(target: str) -> ModuleType:
    """The interop module of an archlab model class (`_target_`)."""
    return importlib.import_module(f"scripts.interop.{FAMILIES[target]}")


def family_of(hf: dict, src: Path) -> ModuleType:
    """The interop module that reads this config.json; a one-line error naming the supported ones otherwise."""
    for target in FAMILIES:
        if family(target).reads(hf):
            return family(target)
    families = [family(target) for target in FAMILIES]
    found = ", ".join(hf.get("architectures", [])) or hf.get("model_type") or "none named"
    supported = ", ".join(a for f in families for a in f.ARCHITECTURES)
    raise ValueError(f"{src}: architecture {found} is not supported (supported: {supported})")


def read_tensors(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors or pytorch_model.bin, sharded (with an index .json) or not."""
    for name, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        files = [src / name] if (src / name).is_file() else []
        if (src / index).is_file():
            files = sorted({src / f for f in json.loads((src / index).read_text())["weight_map"].values()})
        if files:
            tensors: dict[str, np.ndarray] = {}
            for file in files:
                tensors |= _read_file(file)
            return tensors
    raise ValueError(f"{src}: no weights (valid: model.safetensors or pytorch_model.bin, or their sharded "
                     f".index.json forms, beside config.json)")


def _read_file(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise ValueError(f"{file}: weight shard named in the index is missing")
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(file)
    try:
        import torch
    except ImportError:
        raise ValueError(f"{file}: reading pytorch_model.bin needs torch (pip install -e '.[bench]'), "
                         f"or convert it to model.safetensors") from None
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in torch.load(file, map_location="cpu", weights_only=True).items()}


def check_tensors(expected: dict, found: dict[str, np.ndarray], src: Path) -> None:
    """One-line errors for a missing tensor or one whose shape disagrees with config.json."""
    for name, spec in expected.items():
        if name not in found:
            raise ValueError(f"{src}: tensor {name} is missing (expected shape {tuple(spec.shape)} from config.json)")
        if tuple(found[name].shape) != tuple(spec.shape):
            raise ValueError(f"{src}: tensor {name} has shape {tuple(found[name].shape)}, config.json implies "
                             f"{tuple(spec.shape)}")
    unused = sorted(set(found) - set(expected))
    if unused:
        log.info("not used (buffers and tied weights): %s", ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))


# ---- Run directories ----


def check_new_dir(path: Path, what: str) -> None:
    """One-line error unless `path` is absent or an empty directory: nothing is ever written over."""
    if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
        raise ValueError(f"{path} already holds a checkpoint (valid: a new {what})")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} is not empty (valid: a new {what})")


def publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory into place in one rename."""
    if target.exists():
        target.rmdir()  # empty, as check_new_dir made sure
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)


def run_config(model_cfg: dict, tokenizer: Path | None):
    """The composed config of the imported run: its model, and data of the model's kind and sizes."""
    if model_cfg["_target_"] in ("models.vit.ViT", "models.resnet.ResNet"):
        size = model_cfg.get("image_size", 224)
        overrides = ["data=imagenet2012", f"data.image_size={size}", f"data.channels={model_cfg['in_channels']}",
                     f"data.num_classes={model_cfg['num_classes']}"]
    else:
        overrides = ["data=text", f"data.vocab_size={model_cfg['vocab_size']}",
                     f"data.seq_len={min(256, model_cfg.get('max_len', 256))}"]
        if tokenizer is not None:
            overrides.append(f"data.tokenizer={tokenizer}")
    cfg = _config.compose(overrides)
    cfg.model = OmegaConf.create(model_cfg)
    return cfg


def import_checkpoint(src: Path, run_dir: Path) -> None:
    """Write an archlab run directory holding the Hugging Face model in `src`."""
    src, run_dir = Path(src), Path(run_dir).absolute()
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json (valid: a Hugging Face model directory)")
    check_new_dir(run_dir, "RUN_DIR")
    hf = json.loads((src / "config.json").read_text())
    interop = family_of(hf, src)
    model_cfg = interop.model_config(hf)
    model = nnx.eval_shape(lambda: targets.instantiate(model_cfg, _convert_="all", rngs=nnx.Rngs(0)))
    expected = jax.eval_shape(lambda s: interop.to_hf(s, model_cfg), flat_state(model))
    tensors = read_tensors(src)
    tensors = interop.canonical(tensors, hf) if hasattr(interop, "canonical") else tensors
    check_tensors(expected, tensors, src)
    flat = interop.to_archlab(tensors, hf)

    def fill(state: nnx.State) -> nnx.State:
        values = nnx.to_pure_dict(state)
        for path, _ in nnx.to_flat_state(state):
            pretrained.set_leaf(values, path, np.asarray(flat[pretrained.path_name(path)], np.float32))
        nnx.replace_by_pure_dict(state, values)
        return state

    weights = {"params": fill(nnx.state(model, nnx.Param)), "model_state": fill(nnx.state(model, nnx.BatchStat))}
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent if run_dir.parent.exists() else None))
    try:
        tokenizer = None
        if (src / TOKENIZER).is_file():
            shutil.copy(src / TOKENIZER, tmp / TOKENIZER)
            tokenizer = run_dir / TOKENIZER
        cfg = run_config(model_cfg, tokenizer)
        checkpoints = Checkpoints(tmp / "checkpoints", keep=1, async_save=False)
        checkpoints.save(0, weights, {"step": 0, "data_step": 0, "model": model_cfg, "imported_from": str(src)})
        checkpoints.close()
        (tmp / ".hydra").mkdir()
        (tmp / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        publish(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s (%s) into %s", src, model_cfg["_target_"], run_dir)


def export_checkpoint(run_dir: Path, out_dir: Path) -> None:
    """Write a run directory's newest weights as a Hugging Face model directory (config.json, model.safetensors)."""
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir).absolute()
    model_cfg = OmegaConf.to_container(pretrained.run_config(run_dir).model, resolve=True)
    if model_cfg["_target_"] not in FAMILIES:
        raise ValueError(f"{run_dir}: model {model_cfg['_target_']} has no published format "
                         f"(valid: {', '.join(FAMILIES)})")
    check_new_dir(out_dir, "OUT_DIR")
    interop = family(model_cfg["_target_"])
    tensors = {k: np.array(v, order="C") for k, v in interop.to_hf(pretrained.flat_weights(run_dir), model_cfg).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(interop.hf_config(model_cfg) | {"torch_dtype": "float32"},
                                                    indent=2) + "\n")
        if (run_dir / TOKENIZER).is_file():
            shutil.copy(run_dir / TOKENIZER, tmp / TOKENIZER)
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s into %s", run_dir, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face model directory -> archlab run directory")
    imp.add_argument("src", type=Path)
    imp.add_argument("run_dir", type=Path)
    exp = sub.add_parser("export", help="archlab run directory -> Hugging Face model directory")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "import":
            import_checkpoint(args.src, args.run_dir)
        else:
            export_checkpoint(args.run_dir, args.out_dir)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
