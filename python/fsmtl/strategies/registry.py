"""Every method by name: :data:`METHODS` (the plain names), and the two axes the composed methods
combine, :data:`ARCHITECTURES` and :data:`WEIGHTINGS` (``ARCH+WEIGHTING``, e.g. ``tr+gradnorm``,
built by :func:`get_method`). Adding a method: a strategy module that defines its
:class:`~fsmtl.strategies.method.Method` records (or an architecture or weighting
:class:`~fsmtl.strategies.method.Component`), and its module in the lists at the bottom (or
:func:`register_method` from user code)."""

from __future__ import annotations

from .architecture import roaming, routing, se
from .composed import Composed
from .method import Component, Method, MethodOptions
from .sparse import fisher, random, variants
from .weighting import equal, gradnorm, jacobian, mgda_ub, rlw

METHODS: dict[str, Method] = {}

#: The architectures by name; ``shared`` (hard parameter sharing, no per-task routing) is the one
#: every plain weighting uses.
ARCHITECTURES: dict[str, Component | None] = {"shared": None}
#: The weightings of the shared parameters by name.
WEIGHTINGS: dict[str, Component] = {}


def register_method(method: Method) -> Method:
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method, got {type(method).__name__}")
    if method.name in METHODS or "+" in method.name:
        raise ValueError(f"method {method.name!r} is already registered or has a '+' (kept for ARCH+WEIGHTING)")
    METHODS[method.name] = method
    return method


def _composed_factory(architecture: Component, weighting: Component):
    def build(options: MethodOptions) -> Composed:
        return Composed(architecture.factory(options), weighting.factory(options))

    return build


def _axis_member(name: str, axis: dict, what: str, composed: str) -> Component | None:
    if name in axis:
        return axis[name]
    article = "an" if what[0] in "aeiou" else "a"
    if name in METHODS:
        why = f"{name!r} is a method of its own, not {article} {what}"
        if METHODS[name].sparse:
            why += " (a sparse method defines its own masked update)"
    else:
        why = f"{name!r} is not {article} {what}"
    raise ValueError(f"cannot compose {composed!r}: {why}; the {what}s are {', '.join(axis)}")


def compose(name: str) -> Method:
    """The method ``ARCH+WEIGHTING`` (``name``): task routing per :data:`ARCHITECTURES` entry and
    the shared update per :data:`WEIGHTINGS` entry. ``shared+W`` is weighting W alone; ``A+equal``
    is architecture A with equal weights (the plain ``A``)."""
    arch_name, _, weighting_name = name.partition("+")
    architecture = _axis_member(arch_name, ARCHITECTURES, "architecture", name)
    weighting = _axis_member(weighting_name, WEIGHTINGS, "weighting", name)
    if architecture is None:
        return Method(name, weighting.label, weighting.factory, weighting.strategy, variant=name,
                      requires=weighting.requires)  # fmt: skip
    return Method(
        name,
        f"{architecture.label}+{weighting.label}",
        _composed_factory(architecture, weighting),
        Composed,
        variant=name,
        sparse=architecture.sparse,
        requires=tuple(dict.fromkeys(architecture.requires + weighting.requires)),
    )


def get_method(name: str) -> Method:
    """The method ``name``: a plain name of :data:`METHODS` or a composed ``ARCH+WEIGHTING``;
    ValueError naming the choices otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"method {name!r} is not one of {tuple(METHODS)}")
    if name in METHODS:
        return METHODS[name]
    if "+" in name:
        return compose(name)
    raise ValueError(
        f"method {name!r} is not one of {tuple(METHODS)}, nor ARCH+WEIGHTING with an architecture of "
        f"{tuple(ARCHITECTURES)} and a weighting of {tuple(WEIGHTINGS)}"
    )


def _register_weighting(component: Component) -> None:
    WEIGHTINGS[component.name] = component
    register_method(
        Method(
            component.plain,
            component.plain_label or component.label,
            component.factory,
            component.strategy,
            variant=component.name,
            requires=component.requires,
        )  # fmt: skip
    )


def _register_architecture(component: Component) -> None:
    ARCHITECTURES[component.name] = component
    method = compose(f"{component.name}+equal")
    register_method(
        Method(
            component.plain,
            component.plain_label or component.label,
            method.factory,
            Composed,
            variant=component.name,
            sparse=component.sparse,
            requires=component.requires,
        )  # fmt: skip
    )


# Table order: dense baselines, sparse methods, the gradient-balancing peers, then the per-task
# activation modulations.
for _method in equal.METHODS:
    register_method(_method)
for _component in equal.WEIGHTINGS:
    _register_weighting(_component)
for _module in (random, fisher, variants):
    for _method in _module.METHODS:
        register_method(_method)
for _module in (jacobian, gradnorm, mgda_ub, rlw):
    for _component in _module.WEIGHTINGS:
        _register_weighting(_component)
for _module in (se, routing, roaming):
    _register_architecture(_module.ARCHITECTURE)
