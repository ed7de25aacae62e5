"""Config helpers: resolvers, early checks of the command line, of missing values and of each group's keys, types
and ranges, composition for scripts."""

import dataclasses
import inspect
import math
import os
import pkgutil
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

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
    groups = group_dirs(dirs)
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        options = group_options(key, dirs)
        for option in value.split(","):  # a multirun sweeps comma-separated options
            if option and option not in options:
                raise ValueError(f"{key}={option} is not a config option (valid: {', '.join(options)})")


def option_file(group: str, option: str, dirs: Sequence[Path]) -> Path | None:
    """The YAML file of `group=option` in the first config folder that has it (Hydra's search order)."""
    return next((d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()), None)


def option_keys(group: str, option: str, dirs: Sequence[Path]) -> set[str] | None:
    """The keys an option of a config group sets, with those of the same group's options it extends (its defaults
    list: runtime=ssm extends data_parallel, which extends default); None when no config folder has it."""
    file = option_file(group, option, dirs)
    if file is None:
        return None
    node = OmegaConf.load(file)
    keys = set(node) - {"defaults"}
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # dict entries override other groups
            keys |= option_keys(group, entry, dirs) or set()
    return keys


def check_override_keys(overrides: list[str]) -> None:
    """One-line error for `KEY=VALUE` naming a key the config does not have (`trainer.epochs=3`, `nosuch=1`):
    Hydra's own says so in several lines. `+KEY=VALUE` adds a key, which the checks of what takes it see."""
    dirs = config_dirs(overrides)
    if dirs is None or any(o.startswith("+") and o.lstrip("+").partition("=")[0] in group_dirs(dirs)
                           for o in overrides):
        return  # another primary config, or a preset group (+experiment=...) that may pick options and add keys
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    choices = group_choices(overrides, primary, dirs)
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or override.startswith(("+", "~", "-")) or key.startswith("hydra") or "/" in key:
            continue
        root, _, rest = key.partition(".")
        if root in choices and rest:
            choice = choices[root]
            keys = option_keys(root, choice, dirs) if "," not in choice else None  # a sweep: each job checks
            where = f"{root}={choice}"
        elif root in primary and rest:
            keys, where = set(primary[root]), root
        elif root in choices or root in primary:
            continue
        else:
            valid = ", ".join(sorted(set(choices) | set(primary) - {"defaults", "hydra"}))
            raise ValueError(f"{key} is not a setting (valid: {valid}; +{key}=VALUE adds one)")
        name = rest.split(".")[0]
        if keys is not None and name not in keys:
            raise ValueError(f"{root}.{name} is not a setting of {where} (valid: "
                             f"{', '.join(sorted(k for k in keys if k != '_target_'))})")


def group_choices(overrides: list[str], primary: DictConfig, dirs: Sequence[Path]) -> dict[str, str]:
    """The option of each group of the primary config's defaults: the command line's, one a chosen option picks
    (a model config's `override /runtime@_global_.runtime: ssm`), or the default."""
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o and not o.startswith(("+", "-"))}
    choices = {group: given.get(group, option) for entry in primary.defaults if not isinstance(entry, str)
               for group, option in entry.items()}
    for group, option in list(choices.items()):
        file = option_file(group, option, dirs)
        for entry in OmegaConf.load(file).get("defaults", []) if file else []:
            for key, value in entry.items() if not isinstance(entry, str) else []:
                other = key.removeprefix("override").strip().lstrip("/").split("@")[0]
                if other in choices and other not in given:
                    choices[other] = value
    return choices


def group_dirs(dirs: Sequence[Path]) -> set[str]:
    """The config groups: sub-folders of the config folders."""
    return {p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()}


def model_parameters(target: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the model class `target` names (its config's `_target_`)."""
    from hydra.utils import get_class

    targets.check_target(target, "model._target_")
    return dict(inspect.signature(get_class(target).__init__).parameters)


@dataclasses.dataclass
class Trainer:
    """The settings of the `trainer` group (conf/trainer/default.yaml), as types its values are checked against."""

    steps: int
    batch_size: int
    eval_every: int
    eval_batch_size: int
    log_every: int
    seed: int
    compute_dtype: Literal["float32", "bfloat16"]  # fp16 would want loss scaling, which archlab does not do
    nan_policy: Literal["stop", "skip"]
    grad_accum: int
    init_from: str | None
    init_exclude: list[str]
    profile: Any  # train.profiling.check_profile says what a step range is
    max_seconds: float | None
    objective: str


@dataclasses.dataclass
class Checkpoint:
    """The settings of `checkpoint` (conf/config.yaml)."""

    every: int
    keep: int
    async_save: bool


def conforms(value: Any, hint: Any) -> bool:
    """Whether a config value (resolved, plain Python) is of the type `hint` a signature declares; hints this
    does not know (a class, Any) accept anything, leaving the value to the callable."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float, str):  # a bool is an int to Python, not to a config; an int is a float
        return isinstance(value, {int: int, float: (int, float), str: str}[hint]) and not isinstance(value, bool)
    sequence = hint in (list, tuple, Sequence) or origin in (list, tuple, Sequence)
    if sequence:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        return all(conforms(v, args[0]) for v in value) if args else True
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def describe(hint: Any) -> str:
    """A type hint as its source spells it (int, str | None, Sequence[int]); a Literal as its values."""
    if typing.get_origin(hint) is Literal:
        return ", ".join(str(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and any(
            typing.get_origin(a) is Literal for a in typing.get_args(hint)):  # bool | Literal["auto"]: true, false, auto
        return ", ".join("true, false" if a is bool else describe(a) for a in typing.get_args(hint))
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "").replace("collections.abc.", "")


def check_arguments(node: DictConfig, group: str, target: Callable | None = None) -> None:
    """One-line error for a key of config group `group` that its callable does not take (`+model.scan_layers=true`
    on a ResNet), or a value not of the type the callable declares (`model.d_model=abc`, `trainer.steps=1.5`),
    before anything is built. The callable is the node's `_target_` unless `target` is given (a dataclass for the
    groups nothing is built from)."""
    if target is None:
        targets.check_target(node._target_, f"{group}._target_")
        target = pkgutil.resolve_name(node._target_)
    name = f"{target.__module__}.{target.__qualname__}"
    function = target.__init__ if isinstance(target, type) else target  # a Module's class signature is (*args, **kw)
    params = {k: p for k, p in inspect.signature(function).parameters.items() if k != "self"}
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # an annotation that does not resolve here: types are left to the callable
        hints = {}
    values = OmegaConf.to_container(node, resolve=True)
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    settings = dataclasses.is_dataclass(target)  # a group's settings rather than a callable's arguments
    for key, value in values.items():
        if key.startswith("_"):  # _target_, _partial_, ...
            continue
        if key not in params and not open_ended:
            valid = ", ".join(k for k in params if k != "rngs")
            what = f"a setting of {group}" if settings else f"an argument of {name}"
            raise ValueError(f"{group}.{key} is not {what} (valid: {valid})")
        if key in hints and not conforms(value, hints[key]):
            declared = "" if settings else f", as {name} declares {key}"
            raise ValueError(f"{group}.{key}={spelled(value)} is not valid (valid: {describe(hints[key])}{declared})")


def check_model_values(model_cfg: DictConfig) -> None:
    """One-line error for a size of archlab's models that is not positive (`model.hidden=[64,0]`, `num_heads=0`:
    every integer they take is a size or a count; a model of your own may take others) or any model's dropout
    rate outside [0, 1), before the model is built."""
    sizes = model_cfg._target_.startswith("models.")
    written = OmegaConf.to_container(model_cfg, resolve=False)
    for key, value in OmegaConf.to_container(model_cfg, resolve=True).items():
        shown = f"model.{key}={spelled(value)}"
        if OmegaConf.is_interpolation(model_cfg, key):  # named where it is set: model.max_len=0 (= ${data.seq_len})
            shown += f" (= {written[key]})"
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if sizes and any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in numbers):
            raise ValueError(f"{shown} is not valid (valid: positive sizes)")
        if "dropout" in key and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise ValueError(f"{shown} is not valid (valid: a rate, 0 <= {key} < 1)")


def spelled(value: Any) -> str:
    """A config value as a command line spells it: true, null, [1,x]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(spelled(v) for v in value) + "]"
    return str(value)


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
