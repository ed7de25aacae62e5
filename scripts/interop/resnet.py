"""Hugging Face ResNetForImageClassification (microsoft/resnet-*) <-> archlab's models.resnet.ResNet.

Both are torchvision's ResNet v1.5 (stride on the bottleneck's 3x3) with the 7x7/2 stem and max pool. HF's
`hidden_sizes` are each stage's output channels; archlab's `widths` the bottleneck widths (a quarter of those).
"""

import jax
import numpy as np

from scripts.interop import labels, layout_to_archlab, layout_to_hf, num_labels, reads_architecture, require

ARCHITECTURES = ("ResNetForImageClassification",)

# Values older config.json files leave out: ResNetConfig's defaults.
HF_DEFAULTS = {"num_channels": 3, "embedding_size": 64, "layer_type": "bottleneck", "hidden_act": "relu",
               "downsample_in_first_stage": False, "downsample_in_bottleneck": False}
EXPANSION = {"basic": 1, "bottleneck": 4}  # a block's output channels / its width
CONVS = {"basic": 2, "bottleneck": 3}  # convolutions (each with its BatchNorm) in a block


def reads(hf: dict) -> bool:
    """Whether this config.json describes a ResNet classifier."""
    return reads_architecture(hf, ARCHITECTURES, "resnet")


def model_config(hf: dict) -> dict:
    """The archlab model config of a ResNetForImageClassification config.json."""
    hf = HF_DEFAULTS | hf
    require("ResNet", hf, "layer_type", tuple(EXPANSION))
    require("ResNet", hf, "hidden_act", ("relu",))
    require("ResNet", hf, "downsample_in_first_stage", (False,))
    if hf["layer_type"] == "bottleneck":
        require("ResNet", hf, "downsample_in_bottleneck", (False,))
    expansion = EXPANSION[hf["layer_type"]]
    if any(size % expansion for size in hf["hidden_sizes"]):
        raise ValueError(f"ResNet: config.json hidden_sizes: {hf['hidden_sizes']} are not all divisible by "
                         f"{expansion}, a bottleneck's expansion")
    return {
        "_target_": "models.resnet.ResNet", "stage_sizes": list(hf["depths"]),
        "widths": [size // expansion for size in hf["hidden_sizes"]], "block": hf["layer_type"], "stem": "imagenet",
        "num_classes": num_labels(hf),
        "in_channels": hf["num_channels"], "stem_width": hf["embedding_size"], "dtype": "float32",
    }


def hf_config(model_cfg: dict) -> dict:
    """The config.json of an archlab ResNet, exported as a ResNetForImageClassification."""
    check_stem(model_cfg)
    return {
        "architectures": list(ARCHITECTURES), "model_type": "resnet", "num_channels": model_cfg.get("in_channels", 3),
        "embedding_size": model_cfg.get("stem_width") or model_cfg["widths"][0],
        "hidden_sizes": [w * EXPANSION[model_cfg["block"]] for w in model_cfg["widths"]],
        "depths": list(model_cfg["stage_sizes"]), "layer_type": model_cfg["block"], "hidden_act": "relu",
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False, **labels(model_cfg["num_classes"]),
    }


def check_stem(model_cfg: dict) -> None:
    """One-line error for the CIFAR stem (3x3, no pool): HF's ResNet has only the ImageNet one."""
    if model_cfg["stem"] != "imagenet":
        raise ValueError(f"ResNet: stem {model_cfg['stem']!r} has no Hugging Face equivalent (supported: imagenet)")


def layout(model_cfg: dict) -> list[tuple[str, str, str]]:
    """(archlab path, HF name, weight kind) of every weight of the ResNet `model_cfg` describes."""
    check_stem(model_cfg)
    rows = [("stem.conv", "resnet.embedder.embedder.convolution", "conv_no_bias"),
            ("stem.norm", "resnet.embedder.embedder.normalization", "batchnorm")]
    expansion = EXPANSION[model_cfg["block"]]
    c_in = model_cfg.get("stem_width") or model_cfg["widths"][0]
    for i, (n_blocks, width) in enumerate(zip(model_cfg["stage_sizes"], model_cfg["widths"])):
        for j in range(n_blocks):
            ours, theirs = f"stages.{i}.{j}", f"resnet.encoder.stages.{i}.layers.{j}"
            for k in range(CONVS[model_cfg["block"]]):
                rows += [(f"{ours}.conv{k + 1}", f"{theirs}.layer.{k}.convolution", "conv_no_bias"),
                         (f"{ours}.norm{k + 1}", f"{theirs}.layer.{k}.normalization", "batchnorm")]
            if (i > 0 and j == 0) or c_in != width * expansion:
                rows += [(f"{ours}.shortcut.conv", f"{theirs}.shortcut.convolution", "conv_no_bias"),
                         (f"{ours}.shortcut.norm", f"{theirs}.shortcut.normalization", "batchnorm")]
            c_in = width * expansion
    return rows + [("head", "classifier.1", "linear")]


def to_archlab(weights: dict[str, jax.Array], hf: dict) -> dict[str, jax.Array]:
    """HF tensors -> archlab flat state (BatchNorm's num_batches_tracked is a training counter: dropped)."""
    return layout_to_archlab("ResNet", weights, layout(model_config(hf)), f"config.json says depths {hf['depths']}")


def to_hf(state: dict[str, jax.Array], model_cfg: dict) -> dict[str, jax.Array]:
    """archlab flat state -> HF tensors, with the zero num_batches_tracked torch's strict loading expects."""
    counters = {f"{theirs}.num_batches_tracked": np.zeros((), np.int64)
                for _, theirs, kind in layout(model_cfg) if kind == "batchnorm"}
    return layout_to_hf(state, layout(model_cfg)) | counters
