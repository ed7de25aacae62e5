"""Which datasets a model can read, checked before anything is built.

A model config reads values from the data config (`vocab_size: ${data.vocab_size}`), and a model class says
which data tasks it reads (`tasks = ("next_token",)`, as datasets say `task: next_token`). A pair that
fails either gets one line naming the datasets that fit the model, found by resolving the model config against
every data config in conf/data/: no table to keep in step with the configs.
"""

import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from train.config import CONF_DIR, group_options


def model_tasks(target: str) -> tuple[str, ...] | None:
    """The data tasks the model class `target` declares, or None when it declares none (it may read any)."""
    from hydra.utils import get_class

    try:
        return getattr(get_class(target), "tasks", None)
    except Exception:  # noqa: BLE001  (a target that does not import is reported by the checks after this one)
        return None


def mismatch(cfg: DictConfig, data: str) -> str | None:
    """Why the model config `cfg.model` cannot read the data config `cfg.data` (`data`: how to name it), or None."""
    try:
        OmegaConf.to_container(cfg.model, resolve=True)
    except InterpolationResolutionError as e:
        found = re.search(r"Interpolation key '([^']+)' not found", str(e))
        if found is None or not found[1].startswith("data."):
            return f"{e.full_key}: {str(e).splitlines()[0]}"
        return f"{e.full_key} takes ${{{found[1]}}}, which {data} does not have"
    tasks, task = model_tasks(cfg.model._target_), cfg.data.get("task")
    if tasks and task is not None and task not in tasks:
        return f"{cfg.model._target_} reads {' or '.join(tasks)} data, and {data} is {task}"
    return None


def fitting_data(cfg: DictConfig) -> list[str]:
    """The data config options that the model config of `cfg` (with its overrides) can read."""
    base = OmegaConf.to_container(cfg, resolve=False)
    fits = []
    for name in group_options("data"):
        data = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"), resolve=False)
        if mismatch(OmegaConf.create(base | {"data": data}), f"data={name}") is None:
            fits.append(name)
    return fits


def names(cfg: DictConfig) -> tuple[str, str]:
    """How to name the model and the data: `model=gpt`, `data=digits` under `python -m train`, else their targets."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices
        return f"model={chosen.get('model')}", f"data={chosen.get('data')}"
    return f"model {cfg.model._target_}", f"data {cfg.data._target_}"


def check_model_reads_data(cfg: DictConfig) -> None:
    """One-line error when the model cannot read the data, naming the datasets that would fit it."""
    model, data = names(cfg)
    reason = mismatch(cfg, data)
    if reason is not None:
        fits = fitting_data(cfg)
        raise ValueError(f"{model} cannot read {data}: {reason} "
                         f"(datasets that fit {model}: {', '.join(fits) or 'none in conf/data'})")


def check_vocabulary(cfg: DictConfig, dataset) -> None:
    """One-line error when the data's tokenizer makes token ids the model's embedding has no row for."""
    tokens = getattr(getattr(dataset, "tokenizer", None), "vocab_size", None)
    rows = cfg.model.get("vocab_size")
    if tokens is not None and isinstance(rows, int) and rows < tokens:
        raise ValueError(f"model.vocab_size={rows} is smaller than the {tokens:,} tokens of the data's tokenizer "
                         f"(valid: model.vocab_size >= {tokens}; for model=gpt, data.vocab_size={tokens})")
