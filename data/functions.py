"""Target functions on a fixed interval, for the universal approximation experiments (task "regress").

Training points lie on a regular grid over [-pi, pi] (or [-pi, pi]^2); the held-out test points are the
midpoints between neighbouring training points, so the test error measures the fitted function between the
points it was trained on, not outside the interval.
"""

from collections.abc import Callable, Iterator

import numpy as np

from data.sampling import Shard, eval_indices, train_indices


def sawtooth(x: np.ndarray, teeth: int = 3) -> np.ndarray:
    """Continuous sawtooth (triangle wave) with `teeth` teeth over [-pi, pi], values in [0, 1]: non-smooth."""
    phase = (x + np.pi) * teeth / (2 * np.pi)  # one tooth per unit of phase
    return 1.0 - 2.0 * np.abs(phase - np.floor(phase) - 0.5)


# name -> (input dimension, function of an (N, dim) array returning (N,))
TARGETS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "sin3x": (1, lambda x: np.sin(3 * x[:, 0])),
    "sawtooth": (1, lambda x: sawtooth(x[:, 0])),
    "sin_cos": (2, lambda x: np.sin(x[:, 0]) * np.cos(x[:, 1])),
}


def grid(points_per_axis: int, dim: int) -> np.ndarray:
    """A regular grid over [-pi, pi]^dim: (points_per_axis^dim, dim), endpoints included."""
    axis = np.linspace(-np.pi, np.pi, points_per_axis)
    return np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)


def midpoint_grid(points_per_axis: int, dim: int) -> np.ndarray:
    """The grid of midpoints between neighbouring points of `grid`: ((points_per_axis - 1)^dim, dim)."""
    axis = np.linspace(-np.pi, np.pi, points_per_axis)
    mid = (axis[:-1] + axis[1:]) / 2
    return np.stack(np.meshgrid(*[mid] * dim, indexing="ij"), -1).reshape(-1, dim)


class TargetFunction:
    """Noise-free samples of one target: a training grid of `num_points` and the held-out midpoints between them."""

    task = "regress"

    def __init__(self, target: str = "sin3x", num_points: int = 1024, seed: int = 0, **metadata):
        if target not in TARGETS:
            raise ValueError(f"functions: target {target!r} is not known (valid: {', '.join(TARGETS)})")
        dim, self.fn = TARGETS[target]
        points_per_axis = round(num_points ** (1 / dim))
        if points_per_axis < 2 or points_per_axis**dim != num_points:
            raise ValueError(f"functions: num_points {num_points} must be a {dim}-th power of an integer >= 2 for "
                             f"target {target!r} (e.g. {max(points_per_axis, 2) ** dim})")
        if metadata.get("in_features", dim) != dim:
            raise ValueError(f"functions: in_features {metadata['in_features']} does not match target {target!r} "
                             f"(valid: {dim})")
        self.target, self.seed = target, seed
        self.train_x = grid(points_per_axis, dim).astype(np.float32)  # (N, dim)
        self.test_x = midpoint_grid(points_per_axis, dim).astype(np.float32)
        self.train_y = self(self.train_x)  # (N, 1)
        self.test_y = self(self.test_x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The target at points x (N, dim), as float32 (N, 1)."""
        return self.fn(x.astype(np.float64))[:, None].astype(np.float32)

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        """Rows of global batch `step` for this host: shuffled epochs of the training grid, from (seed, step)."""
        idx = train_indices(len(self.train_x), batch_size, step, self.seed, shard)
        return {"x": self.train_x[idx], "y": self.train_y[idx]}

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1),
                     split: str = "test") -> Iterator[dict[str, np.ndarray]]:
        """The held-out midpoints (or, with split="train", the training grid) in full batches; padding has mask 0."""
        if split not in ("train", "test"):
            raise ValueError(f"functions: split {split!r} is not known (valid: train, test)")
        x, y = (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)
        for idx, mask in eval_indices(len(x), batch_size, shard):
            yield {"x": x[idx], "y": y[idx], "mask": mask}
