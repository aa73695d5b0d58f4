"""Per-layer timing: every distinct convolution, attention and norm call of a reconstruction.

The reconstruction of the chosen config and input shape is traced once (`jax.make_jaxpr` of
`ReducioVAE.reconstruct`), and two kinds of work are collected from that one trace:

- convolutions: every `conv_general_dilated` equation of the jaxpr (inside nested jits and
  remat blocks too), keyed by operand shapes and all convolution parameters, so whatever form
  the model's convolutions take (3D, 2D over temporal taps, ...) each distinct primitive call
  is found; it is timed alone with the same primitive and parameters;
- attention and normalisation modules: while tracing, `__call__` of every module class of the
  model whose name contains "Attention" or "Norm" records its input shapes, keyword
  arguments and parameter shapes; the module is rebuilt from its graph definition and timed
  alone with random parameters and inputs of those shapes. A norm inside an attention block is
  listed too, with `within` naming the block (its time is part of the block's).

Each distinct call is timed forward and forward+backward (gradients of a fixed random
cotangent with respect to its inputs and parameters), and rows are sorted by the total
forward time (time x count). Work the rows do not cover (upsampling, elementwise glue,
layout copies) shows as the gap between their sum and the whole reconstruction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from harness import Program, case_config, input_video, measure

from reducio_jax.api import ReducioVAE

HOOKED = re.compile(r"Attention|Norm")


@dataclasses.dataclass
class Site:
    """One distinct call: what it is, how often the reconstruction makes it, how to rerun it."""

    kind: str  # "conv", "attention", "norm"
    name: str
    count: int
    make: Callable[[], tuple[Callable, tuple]]  # -> (function, arguments) to jit and time
    within: str = ""


# -- convolutions from the jaxpr ------------------------------------------------------------------


def _sub_jaxprs(eqn: Any) -> Iterator[tuple[Any, int]]:
    """(jaxpr, multiplicity) of the sub-computations of an equation (scan bodies run `length`
    times; while loops are counted once)."""
    times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr, times
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v, times


def conv_equations(jaxpr: Any, times: int = 1) -> Iterator[tuple[Any, int]]:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn, times
        for sub, n in _sub_jaxprs(eqn):
            yield from conv_equations(sub, times * n)


def _conv_name(eqn: Any) -> str:
    lhs, rhs = (v.aval for v in eqn.invars)
    p = eqn.params
    spec = p["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions in rhs
    kernel = "x".join(str(rhs.shape[i]) for i in spec[2:])
    strides = "x".join(map(str, p["window_strides"]))
    cin, cout = rhs.shape[spec[1]], rhs.shape[spec[0]]
    dims = len(spec) - 2
    groups = f" g{p['feature_group_count']}" if p["feature_group_count"] > 1 else ""
    return (
        f"conv{dims}d {kernel} s{strides}{groups} {cin}->{cout} in {tuple(lhs.shape)} {lhs.dtype}"
    )


def _conv_key(eqn: Any) -> tuple:
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    return avals, tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))


def _conv_maker(eqn: Any) -> Callable[[], tuple[Callable, tuple]]:
    params = dict(eqn.params)
    avals = [v.aval for v in eqn.invars]

    def make():
        def conv(lhs, rhs):
            return jax.lax.conv_general_dilated_p.bind(lhs, rhs, **params)

        return conv, tuple(_random(a.shape, a.dtype, i) for i, a in enumerate(avals))

    return make


# -- attention and norm modules by hooks ----------------------------------------------------------


def _spec(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


@contextlib.contextmanager
def module_hooks(model: nnx.Module, calls: dict) -> Iterator[None]:
    """Records the calls of the model's attention and norm classes into `calls`."""
    classes = {type(m) for _, m in model.iter_modules() if HOOKED.search(type(m).__name__)}
    originals = {cls: cls.__dict__.get("__call__") for cls in classes}
    stack: list[str] = []

    def hooked(cls: type) -> Callable:
        original = cls.__call__

        def call(self, *args, **kwargs):
            graph, params, rest = nnx.split(self, nnx.Param, ...)
            arg_specs = tuple(_spec(a) for a in args)
            key = (cls.__name__, repr(graph), repr(arg_specs), repr(sorted(kwargs.items())))
            if key not in calls:
                calls[key] = {
                    "cls": cls.__name__,
                    "graph": graph,
                    "params": jax.tree.map(_spec, params),
                    "rest": jax.tree.map(_spec, rest),
                    "args": arg_specs,
                    "kwargs": kwargs,
                    "count": 0,
                    "within": stack[-1] if stack else "",
                }
            calls[key]["count"] += 1
            stack.append(cls.__name__)
            try:
                return original(self, *args, **kwargs)
            finally:
                stack.pop()

        return call

    try:
        for cls in classes:
            cls.__call__ = hooked(cls)
        yield
    finally:
        for cls, original in originals.items():
            if original is None:
                del cls.__call__  # it was inherited
            else:
                cls.__call__ = original


def _module_name(call: dict) -> str:
    shapes = ", ".join(
        f"{tuple(a.shape)} {a.dtype}" if isinstance(a, jax.ShapeDtypeStruct) else repr(a)
        for a in call["args"]
    )
    kwargs = "".join(f" {k}={v}" for k, v in sorted(call["kwargs"].items()))
    return f"{call['cls']}{kwargs} in {shapes}"


def _module_maker(call: dict) -> Callable[[], tuple[Callable, tuple]]:
    def make():
        graph, kwargs = call["graph"], call["kwargs"]
        arrays = [i for i, a in enumerate(call["args"]) if isinstance(a, jax.ShapeDtypeStruct)]

        def apply(params, rest, *array_args):
            args = list(call["args"])
            for i, a in zip(arrays, array_args, strict=True):
                args[i] = a
            return nnx.merge(graph, params, rest)(*args, **kwargs)

        params = _random_tree(call["params"], 10)
        rest = _random_tree(call["rest"], 20)
        inputs = tuple(
            _random(call["args"][i].shape, call["args"][i].dtype, 30 + i) for i in arrays
        )
        return apply, (params, rest, *inputs)

    return make


# -- random operands ------------------------------------------------------------------------------


def _random(shape: tuple, dtype: Any, seed: int) -> jax.Array:
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.zeros(shape, dtype)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _random_tree(tree: Any, seed: int) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    values = [_random(a.shape, a.dtype, seed + i) for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, values)


def _float_argnums(args: tuple) -> tuple[int, ...]:
    def is_float(tree):
        leaves = jax.tree.leaves(tree)
        return bool(leaves) and all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves)

    return tuple(i for i, a in enumerate(args) if is_float(a))


def with_backward(fn: Callable, args: tuple) -> tuple[Callable, tuple]:
    """fn -> a function of (args..., cotangent) giving the gradients of <fn(args), cotangent>
    with respect to every floating argument (inputs and parameters)."""
    out = jax.eval_shape(fn, *args)
    cot = _random(out.shape, out.dtype, 99)
    argnums = _float_argnums(args)

    def fwd_bwd(*a):
        *inputs, c = a

        def inner(*xs):
            return jnp.sum(fn(*xs).astype(jnp.float32) * c.astype(jnp.float32))

        return jax.grad(inner, argnums=argnums)(*inputs)

    return fwd_bwd, (*args, cot)


# -- collection and timing ------------------------------------------------------------------------


def collect(cfg: Any, video: np.ndarray) -> list[Site]:
    """The distinct convolutions, attention and norm calls of one reconstruction."""
    with nnx.use_eager_sharding(False):
        vae = ReducioVAE.from_config(cfg, seed=0)
    graph, state = nnx.split(vae.model)
    calls: dict = {}
    jax.clear_caches()  # the model's python code must run: no cached traces
    with module_hooks(vae.model, calls):
        closed = jax.make_jaxpr(lambda s, v: ReducioVAE(nnx.merge(graph, s), cfg).reconstruct(v))(
            state, jax.ShapeDtypeStruct(video.shape, jnp.float32)
        )
    convs: dict = {}
    for eqn, times in conv_equations(closed.jaxpr):
        entry = convs.setdefault(_conv_key(eqn), [eqn, 0])
        entry[1] += times
    sites = [Site("conv", _conv_name(e), n, _conv_maker(e)) for e, n in convs.values()]
    for call in calls.values():
        kind = "attention" if "Attention" in call["cls"] else "norm"
        sites.append(
            Site(kind, _module_name(call), call["count"], _module_maker(call), call["within"])
        )
    return sites


def time_site(site: Site, repeats: int) -> dict:
    fn, args = site.make()
    fwd = measure(Program(jax.jit(fn), args), repeats)
    bwd_fn, bwd_args = with_backward(fn, args)
    both = measure(Program(jax.jit(bwd_fn), bwd_args), repeats)
    return {
        "kind": site.kind,
        "name": site.name,
        "within": site.within,
        "count": site.count,
        "fwd_s": fwd.median_s,
        "fwd_bwd_s": both.median_s,
        "total_fwd_s": fwd.median_s * site.count,
        "total_fwd_bwd_s": both.median_s * site.count,
        "fwd_flops": fwd.flops,
        "fwd_flop_per_s": fwd.flops / fwd.median_s if fwd.flops else None,
        "fwd_bwd_flop_per_s": both.flops / both.median_s if both.flops else None,
    }


def per_layer(case: Any, repeats: int, progress: Callable[[Any], Any] = iter) -> list[dict]:
    """Rows sorted by total forward time, largest first."""
    cfg = case_config(case)
    video = input_video(case.batch, case.frames, int(cfg.data.resolution))
    sites = collect(cfg, video)
    rows = [time_site(s, repeats) for s in progress(sites)]
    return sorted(rows, key=lambda r: r["total_fwd_s"], reverse=True)
