"""Which `_target_`s a config may name, checked before anything is instantiated.

A config is data, not code: a run directory someone shares must not be able to open files or run programs when
it is sampled from or evaluated. A `_target_` must name a callable defined in archlab's own packages, or in a
package named in the ARCHLAB_TARGETS environment variable, which no config file can set:

    ARCHLAB_TARGETS=mypkg,otherpkg.models python -m train --config-dir myconf model=mymodel
"""

import os
import pkgutil
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PACKAGES = ("models", "data", "train.optim")  # train.optim: the optimizers; the rest of train writes files
ENV = "ARCHLAB_TARGETS"


def user_packages() -> tuple[str, ...]:
    """The module prefixes the user allows in ARCHLAB_TARGETS (comma-separated); none when it is unset."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and ENV in (HydraConfig.get().job.env_set or {}):
        raise ValueError(f"hydra.job.env_set.{ENV} is not allowed: a config cannot widen the allowed targets "
                         f"(valid: set {ENV} in the environment that starts the run)")
    packages = tuple(p.strip().rstrip(".") for p in os.environ.get(ENV, "").split(",") if p.strip())
    for p in packages:
        if not all(part.isidentifier() for part in p.split(".")):
            raise ValueError(f"{ENV} entry {p!r} is not a dotted module name (valid: e.g. {ENV}=mypkg,otherpkg.models)")
    return packages


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_target(target: Any, key: str) -> None:
    """One-line error unless `target` names a callable defined in archlab's packages or the user's (ARCHLAB_TARGETS).

    The name is checked before anything is imported, and the object it reaches afterwards, so that a path through
    an allowed module (`data.text.np.savetxt`) cannot reach a callable defined elsewhere.
    """
    user = user_packages()
    allowed = PACKAGES + user
    opt_in = f"({ENV}={','.join(user)})" if user else f"or in your own package, with {ENV}=mypkg in the environment"
    valid = f"valid: a callable defined in {', '.join(p + '.' for p in allowed)} {opt_in}"
    if not isinstance(target, str) or not any(_within(target, p) for p in allowed):
        raise ValueError(f"{key}={target} is not allowed ({valid})")
    try:
        obj = pkgutil.resolve_name(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{key}={target} cannot be found ({type(e).__name__}: {e}; {valid})") from None
    defined = f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else f"a {type(obj).__name__}"
    if not callable(obj) or not (target in user or any(_within(defined, p) for p in allowed)):
        raise ValueError(f"{key}={target} is not allowed: it is {defined}, not a callable defined there ({valid})")


def check(cfg: Any) -> None:
    """One-line error naming the first `_target_` in `cfg`, at any depth and after interpolation, that is not allowed.

    `cfg` is a config node (DictConfig, ListConfig) or plain dicts and lists; every `_target_` counts, whether or
    not the node is later instantiated, partial (`_partial_`), passed on unbuilt (`_recursive_: false`) or in `_args_`.
    """
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
    _walk(cfg, cfg._get_full_key(None) or "", set())


def _walk(node: DictConfig | ListConfig, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an interpolation back to a node already walked
        return
    seen.add(id(node))
    items = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for k in items:
        key = f"{path}.{k}".lstrip(".") if isinstance(node, DictConfig) else f"{path}[{k}]"
        try:
            value = node[k]  # interpolations resolved, as instantiate resolves them
        except OmegaConfBaseException as e:
            if k == "_target_":
                reason = str(e).splitlines()[0]
                raise ValueError(f"{key} cannot be resolved ({reason}), so it is not allowed") from None
            continue  # instantiate fails on it too, before it calls anything
        if k == "_target_":
            check_target(value, key)
            continue
        if isinstance(value, (dict, list)):  # a resolver's result (`oc.decode`): instantiate builds from it too
            value = OmegaConf.create(value, parent=node, flags={"allow_objects": True})
        if isinstance(value, (DictConfig, ListConfig)):
            _walk(value, key, seen)


def instantiate(node: Any, **kwargs) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` after `check(node)`: the one way archlab builds from a config."""
    from hydra.utils import instantiate as hydra_instantiate

    check(node)
    return hydra_instantiate(node, **kwargs)
