"""Objectives, as the data declares them: summed losses and counts, so batches and hosts add up exactly.

Each task maps (model, batch) to sums over the counted targets: "loss" (cross-entropy), "correct" and
"count". A training loss is loss / count; evaluation adds the sums over every batch before dividing.
"""

import math

import jax
import jax.numpy as jnp
import optax

TASKS = ("classify", "next_token", "seq2seq", "regress")


def _sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"loss": jnp.sum(ce * weights), "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


def classify(model, batch: dict) -> dict[str, jax.Array]:
    """Softmax cross-entropy of class logits; `mask` drops evaluation padding rows."""
    weights = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    return _sums(model(batch["image"]), batch["label"], weights)


def next_token(model, batch: dict) -> dict[str, jax.Array]:
    """Teacher forcing: every position predicts the next token, all positions in one forward pass."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T+1) -> (B, T), (B, T)
    weights = batch.get("loss_mask", jnp.ones(targets.shape, jnp.float32))
    if "mask" in batch:
        weights = weights * batch["mask"][:, None]
    return _sums(model(inputs), targets, weights)


def seq2seq(model, batch: dict) -> dict[str, jax.Array]:
    """Teacher-forced translation: the decoder reads tgt[:, :-1] and predicts tgt[:, 1:]; pad (0) is ignored."""
    tgt_in, targets = batch["tgt"][:, :-1], batch["tgt"][:, 1:]
    weights = (targets != 0).astype(jnp.float32)
    if "mask" in batch:
        weights = weights * batch["mask"][:, None]
    return _sums(model(batch["src"], tgt_in), targets, weights)


def regress(model, batch: dict) -> dict[str, jax.Array]:
    """Squared error of real-valued outputs; "loss" / "count" is the mean squared error per output value."""
    pred = model(batch["x"]).astype(jnp.float32)
    weights = jnp.broadcast_to(batch.get("mask", jnp.ones(pred.shape[0]))[:, None], pred.shape)
    sq = jnp.square(pred - batch["y"])
    return {"loss": jnp.sum(sq * weights), "correct": jnp.zeros(()), "count": jnp.sum(weights)}


def metric_sums(task: str, model, batch: dict) -> dict[str, jax.Array]:
    """The summed metrics of `task` on one batch."""
    return {"classify": classify, "next_token": next_token, "seq2seq": seq2seq, "regress": regress}[task](model, batch)


def summarize(sums: dict[str, float], task: str) -> dict[str, float]:
    """Means from summed metrics: loss, accuracy, and bits per token for language modelling."""
    count = max(float(sums["count"]), 1.0)
    out = {"loss": float(sums["loss"]) / count}
    if task != "regress":
        out["accuracy"] = float(sums["correct"]) / count
    if task == "next_token":
        out["bits_per_token"] = out["loss"] / math.log(2)
    return out
