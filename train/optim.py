"""Optimizers from optax: warmup + cosine learning-rate schedule, weight decay that skips what should not decay."""

import jax
import optax

# Parameters that are never decayed besides biases and norm scales: Mamba's SSM A_log and D (Gu & Dao 2023).
NO_DECAY_NAMES = frozenset({"A_log", "D"})


def decay_mask(params):
    """True for weight matrices and kernels; False for vectors (biases, norm scales) and SSM A_log / D."""
    def keep(path, leaf) -> bool:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return leaf.ndim >= 2 and not names & NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(keep, params)


def warmup_cosine(lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `end_lr` at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_lr)


def check(lr: float, end_lr: float, warmup_steps: int, weight_decay: float, clip_norm: float | None,
          **rates: float) -> None:
    """One-line error for a value no optimizer takes: a negative rate, warmup or decay, a clip norm that is not
    positive, a moment or momentum outside [0, 1) (given by name in `rates`)."""
    for key, value in (("lr", lr), ("end_lr", end_lr), ("warmup_steps", warmup_steps), ("weight_decay", weight_decay)):
        if value < 0:
            raise ValueError(f"optim.{key}={value} is negative (valid: 0 or more)")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"optim.clip_norm={clip_norm} is not valid (valid: a positive norm, or null: no clipping)")
    for key, value in rates.items():
        if not 0 <= value < 1:
            raise ValueError(f"optim.{key}={value} is not valid (valid: 0 <= {key} < 1)")


def _with_clipping(tx: optax.GradientTransformation, clip_norm: float | None) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def adamw(lr: float, total_steps: int, *, end_lr: float = 0.0, warmup_steps: int = 0, weight_decay: float = 0.0,
          b1: float = 0.9, b2: float = 0.999, clip_norm: float | None = None) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) on a warmup + cosine schedule."""
    check(lr, end_lr, warmup_steps, weight_decay, clip_norm, b1=b1, b2=b2)
    schedule = warmup_cosine(lr, end_lr, warmup_steps, total_steps)
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    return _with_clipping(tx, clip_norm)


def sgd(lr: float, total_steps: int, *, end_lr: float = 0.0, warmup_steps: int = 0, weight_decay: float = 0.0,
        momentum: float = 0.9, nesterov: bool = False,
        clip_norm: float | None = None) -> optax.GradientTransformation:
    """SGD with momentum and coupled L2 weight decay, on a warmup + cosine schedule."""
    check(lr, end_lr, warmup_steps, weight_decay, clip_norm, momentum=momentum)
    schedule = warmup_cosine(lr, end_lr, warmup_steps, total_steps)
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
    return _with_clipping(tx, clip_norm)
