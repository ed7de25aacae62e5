"""ViT and ResNet interop: imported Hugging Face checkpoints compute what transformers computes, and export back.

The reference is transformers' own code (CPU torch, float32) on small random models whose every weight, and
every BatchNorm statistic, is away from its initial value. Outputs agree within 1e-5 of their largest value.
"""

import json
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import jax
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate
from omegaconf import OmegaConf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

import models  # noqa: E402, F401  (sets nnx's sharding mode before any model is built)
from models.vit import ViT  # noqa: E402
from scripts.convert import export_checkpoint, import_checkpoint  # noqa: E402
from scripts.interop import flat_state, resnet, vit  # noqa: E402
from train.config import compose  # noqa: E402
from train.pretrained import load_model  # noqa: E402

TINY_VIT = {"image_size": 32, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "num_labels": 10}
TINY_RESNET = {"embedding_size": 8, "num_labels": 10}
# name -> (interop module, HF config class, HF model class, config.json values)
CASES = {
    "vit_patch8": (vit, "ViTConfig", "ViTForImageClassification", TINY_VIT | {"patch_size": 8}),
    "vit_patch16_tanh_gelu": (vit, "ViTConfig", "ViTForImageClassification",
                              TINY_VIT | {"patch_size": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "resnet_basic": (resnet, "ResNetConfig", "ResNetForImageClassification",
                     TINY_RESNET | {"hidden_sizes": [8, 16], "depths": [2, 1], "layer_type": "basic"}),
    "resnet_bottleneck": (resnet, "ResNetConfig", "ResNetForImageClassification",
                          TINY_RESNET | {"hidden_sizes": [16, 32], "depths": [1, 2], "layer_type": "bottleneck"}),
}


class Reference(NamedTuple):
    """A saved Hugging Face model and its outputs on `images` (NHWC)."""

    interop: ModuleType
    hf_cls: type
    hf_dir: Path
    images: np.ndarray
    logits: np.ndarray
    pooled: np.ndarray  # ViT: the final [CLS] state; ResNet: the globally pooled last feature map


def hf_outputs(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Hugging Face classifier's logits and pooled features on NHWC images."""
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
    with torch.no_grad():
        if hasattr(model, "vit"):
            pooled = model.vit(pixels).last_hidden_state[:, 0]
        else:
            pooled = model.resnet(pixels).pooler_output.flatten(1)
        return model(pixels).logits.numpy(), pooled.numpy()


@nnx.jit
def archlab_outputs(model: nnx.Module, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An archlab classifier's logits and pooled features, the counterparts of `hf_outputs`."""
    features = model.features(images)
    return model(images), features[:, 0] if isinstance(model, ViT) else features.mean((1, 2))


def assert_close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory) -> Reference:
    """A random HF model with non-trivial weights and BatchNorm statistics, saved with save_pretrained."""
    interop, config_cls, model_cls, values = CASES[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**values))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "running" not in name:
                tensor.add_(0.1 * torch.randn_like(tensor))  # LayerNorm/BatchNorm scales off 1, biases off 0
        model.train()
        for _ in range(3):  # moves BatchNorm's running statistics away from (0, 1)
            model(torch.randn(8, 3, 32, 32) + 0.5)
    model.eval()
    hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(hf_dir)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    return Reference(interop, type(model), hf_dir, images, *hf_outputs(model, images))


@pytest.fixture(scope="module")
def imported(reference) -> tuple[Path, nnx.Module]:
    """The reference imported as an archlab run directory, and the model `load_model` reads from it."""
    run_dir = reference.hf_dir.parent / "run"
    import_checkpoint(reference.hf_dir, run_dir)
    _, model = load_model(run_dir)
    return run_dir, model


def test_imported_checkpoint_matches_reference(reference, imported):
    _, model = imported
    logits, pooled = archlab_outputs(model, reference.images)
    assert_close(logits, reference.logits)
    assert_close(pooled, reference.pooled)


def test_imported_weights_are_the_mapped_tensors(reference, imported):
    hf = json.loads((reference.hf_dir / "config.json").read_text())
    mapped = reference.interop.to_archlab(load_file(reference.hf_dir / "model.safetensors"), hf)
    loaded = flat_state(imported[1])
    assert set(loaded) == set(mapped)
    for name, value in mapped.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_exported_checkpoint_loads_strictly_and_matches_reference(reference, imported):
    run_dir, _ = imported
    export_checkpoint(run_dir, run_dir.parent / "export")
    model, info = reference.hf_cls.from_pretrained(run_dir.parent / "export", output_loading_info=True)
    assert {problem: keys for problem, keys in info.items() if keys} == {}  # strict: every tensor, no other
    logits, pooled = hf_outputs(model.eval(), reference.images)
    assert_close(logits, reference.logits)
    assert_close(pooled, reference.pooled)


def test_exported_tensors_have_the_reference_names_and_shapes(reference):
    hf = json.loads((reference.hf_dir / "config.json").read_text())
    cfg = reference.interop.model_config(hf)
    abstract = nnx.eval_shape(lambda: instantiate(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.eval_shape(partial(reference.interop.to_hf, model_cfg=cfg), flat_state(abstract))
    saved = load_file(reference.hf_dir / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("preset", ["vit_l32", "vit_h14", "resnet18"])
def test_presets_round_trip_through_hf_configs_of_equal_size(preset):
    cfg = OmegaConf.to_container(compose([f"model={preset}", "data=imagenet2012"]).model, resolve=True)
    interop = vit if preset.startswith("vit") else resnet
    hf = interop.hf_config(cfg)
    back = interop.model_config(hf)
    set_in_yaml = {k for k, v in cfg.items() if v is not None} - {"dtype"}  # null: the model's default
    assert {k: back[k] for k in set_in_yaml} == {k: cfg[k] for k in set_in_yaml}
    with torch.device("meta"):  # shapes only: ViT-H/14 would take 2.5 GB
        reference = getattr(transformers, hf["architectures"][0])(transformers.AutoConfig.for_model(**hf))
    archlab = nnx.eval_shape(lambda: instantiate(back, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(archlab, nnx.Param))) == \
        sum(p.numel() for p in reference.parameters())


def test_hf_default_configs_are_the_published_presets():
    # ViTConfig() and ResNetConfig() are google/vit-base-patch16-224 and microsoft/resnet-50.
    for interop, config, preset in ((vit, transformers.ViTConfig(num_labels=1000), "vit_b16"),
                                    (resnet, transformers.ResNetConfig(num_labels=1000), "resnet50")):
        ours = interop.model_config(config.to_dict())
        yaml = OmegaConf.to_container(compose([f"model={preset}", "data=imagenet2012"]).model, resolve=True)
        sizes = set(yaml) - {"_target_", "dtype", "norm_eps", "activation", "stem_width"}
        assert {k: ours[k] for k in sizes} == {k: yaml[k] for k in sizes}


@pytest.mark.parametrize("interop, values, match", [
    (vit, {"qkv_bias": False}, r"ViT: config.json qkv_bias: false is not supported \(supported: true\)"),
    (vit, {"hidden_act": "relu"}, r"ViT: config.json hidden_act: \"relu\" is not supported \(supported: \"gelu\""),
    (resnet, {"downsample_in_first_stage": True}, r"ResNet: config.json downsample_in_first_stage: true .*false"),
    (resnet, {"downsample_in_bottleneck": True}, r"ResNet: config.json downsample_in_bottleneck: true .*false"),
    (resnet, {"hidden_act": "gelu"}, r"ResNet: config.json hidden_act: \"gelu\" is not supported"),
])
def test_unsupported_hf_options_are_one_line_errors(interop, values, match):
    config = (transformers.ViTConfig if interop is vit else transformers.ResNetConfig)(**values)
    with pytest.raises(ValueError, match=match):
        interop.model_config(config.to_dict())


def test_cifar_resnet_cannot_be_exported():
    cfg = {"stage_sizes": [3, 3, 3], "widths": [16, 32, 64], "block": "basic", "stem": "cifar", "num_classes": 10}
    with pytest.raises(ValueError, match=r"ResNet: stem 'cifar' has no Hugging Face equivalent"):
        resnet.hf_config(cfg)
