"""The PyTorch twins of scripts/torch_twins.py: archlab's parameter counts, archlab's loss when given archlab's
parameters, a sane first AdamW step, and a parallel scan that equals the sequential recurrence."""

import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hydra
import jax
from flax import nnx
from omegaconf import OmegaConf

from scripts.bench import SUITE
from scripts.torch_twins import pscan, to_torch, train_loss, twin
from train.config import compose
from train.tasks import metric_sums

# Configurations outside the suite that take the twins' other code paths.
VARIANTS = {
    "mamba_lti": ["model=mamba", "data=bytes", "model.selective=false"],
    "simba_mlp": ["model=simba", "data=digits", "model.channel_mixer=mlp", "model.bidirectional=false"],
    "resnet_bottleneck": ["model=resnet50", "data=digits", "model.stage_sizes=[1,1,1,1]"],
    "gpt_untied": ["model=gpt", "data=bytes", "model.tie_embeddings=false"],
    "transformer_post_learned": ["model=transformer", "data=numbers_en_fr", "model.norm=post",
                                 "model.positions=learned", "model.share_embeddings=false"],
}


def archlab_and_twin_counts(overrides: list[str]) -> tuple[int, int]:
    cfg = compose(overrides)
    model = nnx.eval_shape(lambda: hydra.utils.instantiate(cfg.model, _convert_="all", rngs=nnx.Rngs(0)))
    archlab = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    torch_model = twin(OmegaConf.to_container(cfg.model, resolve=True))
    return archlab, sum(p.numel() for p in torch_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [*SUITE, *VARIANTS])
def test_twin_has_archlab_parameter_count(name):
    archlab, torch_count = archlab_and_twin_counts({**SUITE, **VARIANTS}[name])
    assert torch_count == archlab


# How far from chance (ln of the number of classes or tokens) the first loss may be. Every twin's logits start at
# scale ~1 or less, except the Transformer's: its tied head scores the decoder's own input token ~sqrt(d_model)
# above the rest, and PyTorch's default Linear init (a third of archlab's lecun-normal variance) leaves that input
# embedding dominant in the residual stream (measured: archlab starts 1.0 nats above chance, the twin 3.2-3.5).
INIT_LOSS_SLACK = {"transformer": 4.0}


@pytest.mark.parametrize("name", SUITE)
def test_first_adamw_step_starts_near_chance_and_lowers_the_loss(name):
    torch.manual_seed(0)
    cfg = compose(SUITE[name])
    model = twin(OmegaConf.to_container(cfg.model, resolve=True))
    batch = to_torch(hydra.utils.instantiate(cfg.data).train_batch(0, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    loss = train_loss(model, cfg.data.task, batch)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        loss_after = train_loss(model, cfg.data.task, batch)

    num_outputs = cfg.data.num_classes if cfg.data.task == "classify" else cfg.data.vocab_size
    assert abs(loss.item() - math.log(num_outputs)) < INIT_LOSS_SLACK.get(name, 1.0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(loss_after) and loss_after < loss


# Torch parameter name -> archlab parameter path, where the twin's module tree differs from archlab's.
RENAMES = [
    (r"^stem\.0\.", "stem.conv."), (r"^stem\.1\.", "stem.norm."),  # ResNet: each conv-BN pair is one Sequential
    (r"\.conv(\d)\.0\.", r".conv\1."), (r"\.conv(\d)\.1\.", r".norm\1."),
    (r"\.shortcut\.0\.", ".shortcut.conv."), (r"\.shortcut\.1\.", ".shortcut.norm."),
    (r"^(encoder\.\d+)\.self_attn\.norm\.", r"\1.norm1."),  # Transformer: a Sublayer holds f and its norm
    (r"^(encoder\.\d+)\.mlp\.norm\.", r"\1.norm2."), (r"^(decoder\.\d+)\.self_attn\.norm\.", r"\1.norm1."),
    (r"^(decoder\.\d+)\.cross_attn\.norm\.", r"\1.norm2."), (r"^(decoder\.\d+)\.mlp\.norm\.", r"\1.norm3."),
    (r"\.f\.", "."), (r"^(src|tgt)_pos$", r"\1_pos_embed.embedding"),
    (r"conv1d\.weight$", "conv_kernel"), (r"conv1d\.bias$", "conv_bias"),  # Mamba's depthwise conv
]
# archlab's name for the `weight` of a torch module, and the torch layout of archlab's array.
WEIGHT_NAMES = {torch.nn.Linear: "kernel", torch.nn.Conv2d: "kernel", torch.nn.Embedding: "embedding",
                torch.nn.LayerNorm: "scale", torch.nn.RMSNorm: "scale", torch.nn.BatchNorm2d: "scale"}
LAYOUTS = {
    torch.nn.Linear: lambda w: w.T,  # (in, out) -> (out, in)
    torch.nn.Conv2d: lambda w: w.transpose(3, 2, 0, 1),  # (kh, kw, in, out) -> (out, in, kh, kw)
    torch.nn.Conv1d: lambda w: w.T[:, None, :],  # depthwise (K, D) -> (D, 1, K)
}


def load_archlab_parameters(torch_model, archlab_model, name: str) -> None:
    """Copy every archlab parameter into the twin, each exactly once."""
    archlab = {".".join(map(str, path)): np.asarray(v[...])
               for path, v in nnx.to_flat_state(nnx.state(archlab_model, nnx.Param))}
    if name == "lenet":  # the twin flattens its 16 x 4 x 4 features as (C, H, W), archlab as (H, W, C)
        kernel = archlab["classifier.hidden.0.kernel"]
        archlab["classifier.hidden.0.kernel"] = kernel.reshape(4, 4, 16, -1).transpose(2, 0, 1, 3).reshape(256, -1)
    used = []
    with torch.no_grad():
        for param_name, param in torch_model.named_parameters():  # a tied weight is listed once, at its embedding
            module_name, _, leaf = param_name.rpartition(".")
            kind = type(torch_model.get_submodule(module_name))
            path = param_name
            for pattern, replacement in RENAMES:
                path = re.sub(pattern, replacement, path)
            path = re.sub(r"weight$", WEIGHT_NAMES.get(kind, "weight"), path)
            value = archlab[path]
            if leaf == "weight" and kind in LAYOUTS:
                value = LAYOUTS[kind](value)
            param.copy_(torch.tensor(value))
            used.append(path)
    assert sorted(used) == sorted(archlab)


@pytest.mark.parametrize("name", [*SUITE, *VARIANTS])
def test_twin_with_archlab_parameters_gives_archlab_loss(name):
    cfg = compose({**SUITE, **VARIANTS}[name])
    archlab_model = hydra.utils.instantiate(cfg.model, _convert_="all", rngs=nnx.Rngs(0))
    # Noise on every parameter, so that zero-initialised heads, unit norm scales etc. check something too.
    rng = np.random.default_rng(0)
    nnx.update(archlab_model, jax.tree.map(lambda v: np.asarray(v) + rng.normal(0.0, 0.1, v.shape).astype(v.dtype),
                                           nnx.state(archlab_model, nnx.Param)))
    torch_model = twin(OmegaConf.to_container(cfg.model, resolve=True))
    load_archlab_parameters(torch_model, archlab_model, name)
    batch = hydra.utils.instantiate(cfg.data).train_batch(0, 4)

    sums = nnx.jit(metric_sums, static_argnums=0)(cfg.data.task, archlab_model, batch)
    expected = float(sums["loss"] / sums["count"])
    assert train_loss(torch_model, cfg.data.task, to_torch(batch)).item() == pytest.approx(expected, rel=1e-5)


def sequential_scan(A, X):
    """H_t = A_t H_{t-1} + X_t, one step at a time: the definition the parallel scan must equal."""
    h, hs = torch.zeros_like(X[:, 0]), []
    for t in range(X.shape[1]):
        h = A[:, t] * h + X[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 8, 13, 32])
def test_parallel_scan_equals_sequential(length):
    generator = torch.Generator().manual_seed(length)
    A = torch.rand(2, length, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    X = torch.randn(2, length, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(2, length, 3, 4, dtype=torch.float64, generator=generator)

    parallel, sequential = pscan(A, X), sequential_scan(A, X)
    grads_parallel = torch.autograd.grad(parallel, (A, X), upstream)
    grads_sequential = torch.autograd.grad(sequential, (A, X), upstream)

    torch.testing.assert_close(parallel, sequential, rtol=1e-12, atol=1e-12)
    for g_par, g_seq in zip(grads_parallel, grads_sequential):
        torch.testing.assert_close(g_par, g_seq, rtol=1e-12, atol=1e-12)
