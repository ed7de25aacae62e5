"""`python -m train [overrides]`: compose the config, check it, set up devices, train.

    python -m train                                   # LeNet on digits (the default experiment)
    python -m train model=mlp 'model.hidden=[512,512]' optim.lr=1e-3 trainer.steps=2000
    python -m train -m optim.lr=1e-4,3e-4,1e-3        # a sweep
"""

import sys

from train.preemption import catch_stop_signals

catch_stop_signals()  # first: a SIGTERM during the imports and set-up below must not end the run silently

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from train import config, runlock, runtime  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration; returns the final objective (for sweepers such as optuna)."""
    try:
        runtime.apply(**cfg.runtime)
    except ValueError as e:
        sys.exit(f"error: {e}")
    import jax
    from jax.errors import JaxRuntimeError

    from train import hosts, loop, mesh  # imported here so the runtime settings precede JAX's start-up
    from train.checkpoint import DiskFull
    from train.preemption import NonFinite

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        config.check_arguments(cfg.distributed, "distributed", mesh.initialize_distributed)
        mesh.initialize_distributed(**cfg.distributed)
        lock = runlock.acquire(run_dir, jax.process_index())  # held already unless a sweep's job or a TPU pod
        exp = loop.setup(cfg, run_dir)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        metrics = loop.train(exp)
    except (NonFinite, DiskFull) as e:
        sys.exit(f"error: {e}")
    except JaxRuntimeError:
        hosts.await_loss()  # a collective failed: when a process was lost, the watchdog names it and exits
        raise
    finally:
        runlock.release(lock)
    if cfg.trainer.objective not in metrics:  # a dataset's own final metrics are known only now
        sys.exit(f"error: trainer.objective={cfg.trainer.objective} is not a metric of this run (valid: "
                 f"{', '.join(metrics)}); its results are saved in {run_dir}")
    return metrics[cfg.trainer.objective]


if __name__ == "__main__":
    try:
        config.check_group_choices(sys.argv[1:])
        config.check_override_keys(sys.argv[1:])
        config.check_run_dir(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    main()
