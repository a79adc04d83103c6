"""Name -> factory registry of the model zoo.

Registering is a decorator on a plain module-level factory function, so importing the zoo only
defines functions: no network is built (and no weights allocated) until `create_model` is
called. Each factory's docstring is the model's documentation: the report it comes from, what
the report states and what had to be inferred where the report is silent.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: the factory that builds it and the report it reproduces."""

    name: str
    factory: ModelFactory
    source: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, source: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering `factory(num_classes=7, in_chans=1, **kwargs) -> nn.Module`.

    `source` names the report (and section) the architecture comes from, e.g.
    "report-003, Experiment 4". A second registration under the same name is a programming
    error (two modules claiming one name), so it raises instead of silently overwriting.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice "
                             f"({_REGISTRY[name].factory.__module__} and {factory.__module__})")
        if not (factory.__doc__ or "").strip():
            raise ValueError(f"model {name!r} ({factory.__module__}) needs a docstring")
        _REGISTRY[name] = ModelEntry(name=name, factory=factory, source=source)
        return factory

    return decorator


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; valid names: "
                         f"{', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 7, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Build a fresh, randomly initialised model.

    Input: float tensor (B, in_chans, 48, 48), already normalised (vgg_khaireddin also takes
    40x40); output: raw logits (B, num_classes). Extra keyword arguments are model specific
    (see `model_info(name)["details"]`); an unknown one raises TypeError from the factory.
    """
    entry = _entry(name)
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"model {name!r}: num_classes and in_chans must be >= 1, "
                         f"got num_classes={num_classes}, in_chans={in_chans}")
    model = entry.factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    # Remember how the model was built, so checkpoints and shipped weights can rebuild it
    # from the registry without pickling code.
    model.registry_name = name
    model.registry_kwargs = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    return model


def model_info(name: str) -> dict[str, str]:
    """dict(name, source, description, details) of a registered model, without building it.

    description: the docstring's first paragraph (one line of what it is);
    details: the whole docstring (report statements, inferred choices, keyword arguments).
    """
    entry = _entry(name)
    details = inspect.cleandoc(entry.factory.__doc__ or "")
    description = " ".join(details.split("\n\n")[0].split())
    return {"name": name, "source": entry.source, "description": description, "details": details}
