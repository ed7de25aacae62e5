"""Config helpers: resolvers, early checks of the command line and of missing values, composition for scripts."""

import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from train import targets

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda *xs: math.prod(int(x) for x in xs))


def default_compute_dtype(backend: str | None = None) -> str:
    """bfloat16 on GPU and TPU, where their matrix units run it at full rate; float32 on CPU, which has none.

    Parameters and optimizer state stay float32 (param_dtype); the loss, attention softmax and the Mamba scan
    compute in float32 whatever this says.
    """
    import jax

    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


if not OmegaConf.has_resolver("default_compute_dtype"):
    OmegaConf.register_new_resolver("default_compute_dtype", lambda: default_compute_dtype())


def config_dirs(args: list[str]) -> list[Path] | None:
    """conf/ and the config folders the command line adds (`--config-dir DIR`, `hydra.searchpath=[file://DIR]`),
    in Hydra's order; None when options may come from elsewhere too (`--config-path`, a `pkg://` search path)."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd") and (eq or i + 1 < len(args)):
            dirs.append(Path(value if eq else args[i + 1]))
        elif flag in ("--config-path", "-cp", "--config-name", "-cn"):
            return None  # another primary config, which may set its own hydra.searchpath
        elif flag.lstrip("+") == "hydra.searchpath":
            for entry in value.strip("[]").split(","):
                scheme, _, path = entry.strip().strip("'\"").rpartition("://")
                if scheme not in ("", "file"):
                    return None
                dirs.append(Path(path))
    return dirs


def group_options(group: str, dirs: Sequence[Path] = (CONF_DIR,)) -> list[str]:
    """The options of config group `group` (e.g. model -> lenet, mlp, ...) in the config folders `dirs`."""
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def check_group_choices(overrides: list[str]) -> None:
    """One-line error for `group=option` overrides naming an option that does not exist in any config folder."""
    dirs = config_dirs(overrides)
    if dirs is None:
        return  # Hydra's own check applies
    groups = {p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()}
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        options = group_options(key, dirs)
        for option in value.split(","):  # a multirun sweeps comma-separated options
            if option and option not in options:
                raise ValueError(f"{key}={option} is not a config option (valid: {', '.join(options)})")


def check_model_keys(overrides: list[str]) -> None:
    """One-line error for `model.KEY=VALUE` naming a key the chosen model config does not have."""
    if any(o.lstrip("+").startswith("experiment=") for o in overrides):
        return  # a preset picks the model: Hydra's own check applies
    choice = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "lenet")
    files = [d / "model" / f"{choice}.yaml" for d in config_dirs(overrides) or []]
    if "," in choice or not any(f.is_file() for f in files):
        return
    keys = set(OmegaConf.load(next(f for f in files if f.is_file())))
    for override in overrides:
        key, sep, _ = override.partition("=")
        if sep and key.startswith("model.") and key.split(".")[1] not in keys:
            raise ValueError(f"{key} is not a setting of model={choice} (valid: "
                             f"{', '.join(sorted(k for k in keys if k != '_target_'))})")


def model_parameters(target: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the model class `target` names (its config's `_target_`)."""
    from hydra.utils import get_class

    targets.check_target(target, "model._target_")
    return dict(inspect.signature(get_class(target).__init__).parameters)


def check_model_arguments(model_cfg: DictConfig) -> None:
    """One-line error for a model config key its class does not take (e.g. `+model.scan_layers=true` on a ResNet)."""
    params = model_parameters(model_cfg._target_)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for key in model_cfg:
        if key != "_target_" and key not in params:
            valid = ", ".join(k for k in params if k not in ("self", "rngs"))
            raise ValueError(f"model.{key} is not an argument of {model_cfg._target_} (valid: {valid})")


def check_run_dir(overrides: list[str]) -> None:
    """One-line error when the run directory cannot be created (checked before Hydra tries to)."""
    target = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), "outputs")
    existing = Path(target).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"output directory {target} cannot be created: {existing} is not a writable directory; "
                         f"choose another with hydra.run.dir=PATH")


def check_missing(cfg: DictConfig) -> None:
    """One-line error naming every required value (`???`) left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required value(s): {', '.join(missing)} "
                         f"(set on the command line, e.g. {missing[0]}=VALUE)")


def compose(overrides: list[str] = (), config_name: str = "config") -> DictConfig:
    """The composed config for `overrides`, as `python -m train` would see it (for tests and scripts)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    check_group_choices(list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
