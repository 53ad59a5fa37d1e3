"""Eager proxies of scripted modules, so that forward hooks fire (files are read by :mod:`.torchscript`).

PyTorch refuses forward hooks on ``ScriptModule``s, and the engine explains a layer by hooking it. A loaded
TorchScript file is therefore wrapped in an *eager proxy*: a tree of ordinary ``nn.Module``s with the scripted
module's hierarchy and dotted names (``enc``, ``enc.0``, ``dec.1``... exactly as the eager model had), holding the
scripted module's own parameter and buffer tensors (same objects: ``parameters()``, ``requires_grad`` toggles and
``state_dict`` keys behave like the original model's). A proxy runs its module's TorchScript graph step by step
in Python, so that a call to a sub-module goes through that sub-module's proxy, where forward hooks fire:

- ``interpreted``: the graph calls sub-modules; its nodes (``aten::*``/``prim::*`` operators through the exact
  ``torch.ops`` overload, attribute reads, method calls, free TorchScript functions, lists/tuples/dicts,
  ``prim::If`` and ``prim::Loop``) are executed one by one.
- ``leaf``: the graph calls no sub-module (``Conv3d``, ``ReLU``...): the scripted forward runs as is.
- ``opaque``: the graph uses something the interpreter does not run (``prim::fork``, ``prim::SetAttr``, ``with``
  blocks, in-place changes of lists through operators it does not know): the scripted forward runs as one call.
  The module itself is hookable, the modules *inside* it are not (:func:`torchscript_layers` says which, why).
- ``container``: no forward (``ModuleList``); its children are called by their parent.

Outputs equal the scripted module's (the same kernels run in the same order); scripted control flow is interpreted.
"""

import re
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from ...errors import ModelError

_FORWARD = re.compile(r"^forward\d*$")  # traced modules called twice get forward1, forward2...


# --------------------------------------------------------------------------------------------- interpreter
class _Unsupported(Exception):
    """A graph node the interpreter does not run; its module then runs opaquely."""


Step = Callable[[Dict[int, Any]], None]


def _uids(values) -> List[int]:
    return [value.unique() for value in values]


def _walk(block):
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _walk(sub)


def _compile_block(block, cu) -> Tuple[List[Step], List[int], List[int]]:
    return [_compile_node(node, cu) for node in block.nodes()], _uids(block.inputs()), _uids(block.outputs())


def _run_steps(steps: List[Step], env: Dict[int, Any]) -> None:
    for step in steps:
        step(env)


def _assign(outs: List[int], fn: Callable, ins: List[int]) -> Step:
    if len(outs) == 1:
        out = outs[0]

        def step(env):
            env[out] = fn(*[env[i] for i in ins])
    elif not outs:
        def step(env):
            fn(*[env[i] for i in ins])
    else:
        def step(env):
            values = fn(*[env[i] for i in ins])
            if len(values) != len(outs):
                raise RuntimeError("expected %d values to unpack, got %d" % (len(outs), len(values)))
            env.update(zip(outs, values))
    return step


def _raise(*args):
    raise RuntimeError(str(args[0]) if args else "exception raised by the TorchScript code")


def _pop(container, *args):
    return container.pop(*args)


def _set_item(container, key, value):
    container[key] = value
    return container


# operators on Python lists/dicts/strings that must act in place (torch.ops would copy the list)
_CONTAINER_OPS: Dict[str, Callable] = {
    "aten::__getitem__": lambda a, i: a[i], "aten::len": len, "aten::_set_item": _set_item,
    "aten::append": lambda a, v: (a.append(v), a)[1], "aten::insert": lambda a, i, v: a.insert(i, v),
    "aten::pop": _pop, "aten::extend": lambda a, b: a.extend(b), "aten::clear": lambda a: a.clear(),
    "aten::reverse": lambda a: a.reverse(), "aten::copy": lambda a: a.copy(), "aten::list": list,
    "aten::keys": lambda d: list(d.keys()), "aten::values": lambda d: list(d.values()),
    "aten::items": lambda d: list(d.items()), "aten::__contains__": lambda a, v: v in a,
    "aten::add": lambda a, b: a + b, "aten::add_": lambda a, b: (a.extend(b), a)[1], "aten::mul": lambda a, n: a * n, "aten::eq": lambda a, b: a == b,
    "aten::ne": lambda a, b: a != b, "aten::slice": lambda a, s, e, k: a[s:e:k],
    "aten::sort": lambda a, reverse=False: a.sort(reverse=reverse),
}
_PYTHON_OPS: Dict[str, Callable] = {
    "aten::__is__": lambda a, b: a is b, "aten::__isnot__": lambda a, b: a is not b,
    "aten::__not__": lambda a: not a, "aten::format": lambda fmt, *args: fmt.format(*args),
    "aten::warn": lambda message, *args: warnings.warn(str(message)), "aten::dict": dict,
    "aten::__range_length": lambda lo, hi, step: max(0, (hi - lo + step - (1 if step > 0 else -1)) // step),
    "aten::__derive_index": lambda index, start, step: start + index * step,
    "prim::unchecked_cast": lambda value: value, "prim::Uninitialized": lambda: None,
    "prim::ListConstruct": lambda *a: list(a), "prim::TupleConstruct": lambda *a: tuple(a),
    "prim::DictConstruct": lambda *a: dict(zip(a[::2], a[1::2])), "prim::TupleUnpack": lambda t: tuple(t),
    "prim::ListUnpack": lambda a: tuple(a), "prim::TupleIndex": lambda t, i: t[i],
    "prim::RaiseException": _raise, "prim::Print": lambda *a: print(*a),
}
_CONTAINER_KINDS = ("ListType", "DictType", "StringType", "TupleType")


def _torch_op(node) -> Callable:
    """The exact overload of ``torch.ops`` the node's schema names; keyword-only arguments passed by name."""
    text = node.schema()
    if text == "(no schema)":  # structural nodes: prim::fork, prim::SetAttr, prim::CallFunction, prim::Enter...
        raise _Unsupported(node.kind())
    schema = torch._C.parse_schema(text)
    if len(schema.arguments) != len(list(node.inputs())):
        raise _Unsupported(node.kind())
    space, name = schema.name.split("::", 1)
    try:
        op = getattr(getattr(getattr(torch.ops, space), name), schema.overload_name or "default")
    except (AttributeError, RuntimeError) as exc:
        raise _Unsupported(schema.name) from exc
    keywords = [arg.name for arg in schema.arguments if arg.kwarg_only]
    if not keywords:
        return op
    split = len(schema.arguments) - len(keywords)
    return lambda *args: op(*args[:split], **dict(zip(keywords, args[split:])))


def _constant(node, cu):
    kind = node.output().type().kind()
    if kind == "FunctionType":  # a free function called by prim::CallFunction: look it up in the file's code
        name = str(node.output().type())
        for unit in (cu, getattr(getattr(torch.jit, "_state", None), "_python_cu", None)):  # file, this process
            function = None if unit is None else unit.find_function(name)
            if function is not None:
                return function
        raise _Unsupported("prim::CallFunction")
    try:
        return node.output().toIValue()
    except Exception as exc:  # noqa: BLE001 - a constant type without a Python value
        raise _Unsupported("prim::Constant of type %s" % node.output().type()) from exc


def _compile_node(node, cu) -> Step:
    """One node as a step on the environment (value id -> value); ``cu``: the file's compilation unit."""
    kind = node.kind()
    ins, outs = _uids(node.inputs()), _uids(node.outputs())
    if kind == "prim::Constant":
        value = _constant(node, cu)
        out = outs[0]
        if isinstance(value, list):
            return lambda env: env.__setitem__(out, list(value))  # lists are mutable: one per execution
        return lambda env: env.__setitem__(out, value)
    if kind == "prim::GetAttr":
        name = node.s("name")
        return _assign(outs, lambda obj: _get_attr(obj, name), ins)
    if kind == "prim::CallMethod":
        name = node.s("name")
        return _assign(outs, lambda obj, *args: _call_method(obj, name, args), ins)
    if kind == "prim::TupleSlice":
        begin, end = node.i("beg"), node.i("end")
        return _assign(outs, lambda t: t[begin:end], ins)
    if kind == "prim::CallFunction":  # a free TorchScript function: it cannot call modules, so run it whole
        return _assign(outs, lambda function, *args: function(*args), ins)
    if kind == "prim::If":
        return _compile_if(node, ins, outs, cu)
    if kind == "prim::Loop":
        return _compile_loop(node, ins, outs, cu)
    if kind in ("prim::TupleUnpack", "prim::ListUnpack") and len(outs) == 1:
        return _assign(outs, lambda t: t[0] if len(t) == 1 else _raise("expected 1 value to unpack"), ins)
    if kind in _PYTHON_OPS:
        return _assign(outs, _PYTHON_OPS[kind], ins)
    inputs = list(node.inputs())
    if kind in _CONTAINER_OPS and inputs and inputs[0].type().kind() in _CONTAINER_KINDS:
        return _assign(outs, _CONTAINER_OPS[kind], ins)
    op = _torch_op(node)
    if any(arg.type.kind() in _CONTAINER_KINDS and arg.alias_info is not None and arg.alias_info.is_write
           for arg in torch._C.parse_schema(node.schema()).arguments):
        raise _Unsupported(kind)  # mutates a list in place: a copy through torch.ops would lose the change
    return _assign(outs, op, ins)


def _compile_if(node, ins, outs, cu) -> Step:
    then_block, else_block = [_compile_block(block, cu) for block in node.blocks()]
    cond = ins[0]

    def step(env):
        steps, _, results = then_block if env[cond] else else_block
        _run_steps(steps, env)
        env.update(zip(outs, [env[r] for r in results]))
    return step


def _compile_loop(node, ins, outs, cu) -> Step:
    body, body_ins, body_outs = _compile_block(next(iter(node.blocks())), cu)
    trips, cond0, carried = ins[0], ins[1], ins[2:]

    def step(env):
        limit, cond, values = env[trips], env[cond0], [env[i] for i in carried]
        count = 0
        while cond and count < limit:
            env[body_ins[0]] = count
            env.update(zip(body_ins[1:], values))
            _run_steps(body, env)
            cond, values = env[body_outs[0]], [env[o] for o in body_outs[1:]]
            count += 1
        env.update(zip(outs, values))
    return step


class _Program:
    """One method of a scripted module, compiled to Python steps."""

    def __init__(self, method, cu):
        self.steps, inputs, self.outputs = _compile_block(method.graph, cu)
        self.self_id, self.arg_ids = inputs[0], inputs[1:]
        self.defaults = [arg.default_value for arg in method.schema.arguments[1:]]
        self.has_default = [arg.has_default_value() for arg in method.schema.arguments[1:]]

    def run(self, owner, args):
        args = list(args)
        if len(args) > len(self.arg_ids) or not all(self.has_default[len(args):]):
            raise TypeError("expected %d arguments, got %d" % (len(self.arg_ids), len(args)))
        args += self.defaults[len(args):]
        env = {self.self_id: owner}
        env.update(zip(self.arg_ids, args))
        _run_steps(self.steps, env)
        return env[self.outputs[0]] if len(self.outputs) == 1 else tuple(env[o] for o in self.outputs)


def _get_attr(obj, name):
    return obj._ts_attr(name) if isinstance(obj, ScriptProxy) else getattr(obj, name)


def _call_method(obj, name, args):
    return obj._ts_call(name, args) if isinstance(obj, ScriptProxy) else getattr(obj, name)(*args)


# --------------------------------------------------------------------------------------------- eager proxy
def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """The scripted module's tensor itself, accepted as a Parameter (``_is_param``: PyTorch's protocol for
    tensors that are parameters without being ``nn.Parameter`` instances), so ``requires_grad`` toggles reach the
    scripted code. Older PyTorch: a Parameter sharing the storage (values shared, flags not)."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    tensor._is_param = True
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=tensor.requires_grad)


class ScriptProxy(nn.Module):
    """Eager stand-in for one scripted module (see the module docstring); ``type(proxy).__name__`` is the
    original class name (``Conv3d``...). Attributes: ``_ts_script`` (the scripted module), ``_ts_mode``
    (``interpreted``, ``leaf``, ``opaque`` or ``container``), ``_ts_note`` (why a module is opaque)."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        self.__dict__.update(_ts_script=script, _ts_programs={}, _ts_mode="leaf", _ts_note="")
        self.training = bool(script.training)
        for name, child in script.named_children():
            self.add_module(name, _proxy_for(child))
        for name, value in script._parameters.items():
            if value is not None:
                self.register_parameter(name, _as_parameter(value))
        for name, value in script._buffers.items():
            if value is not None:
                self.register_buffer(name, value)

    def forward(self, *args, _ts_method: str = "forward"):
        return self._ts_run(_ts_method, args)

    def _ts_run(self, method: str, args):
        program = self._ts_programs.get(method)
        if program is not None:
            return program.run(self, args)
        for module in self.modules():  # the scripted code reads its own training flags
            if isinstance(module, ScriptProxy) and module._ts_script.training != module.training:
                module._ts_script.training = module.training
        return getattr(self._ts_script, method)(*args)

    def _ts_call(self, method: str, args):
        if _FORWARD.match(method):
            return self(*args, _ts_method=method)  # through nn.Module.__call__: hooks fire
        return self._ts_run(method, args)

    def _ts_attr(self, name: str):
        for table in (self._modules, self._parameters, self._buffers):
            if name in table:
                return table[name]
        if name == "training":
            return self.training
        return getattr(self._ts_script, name)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.double()``...: parameters change in place (``.data``), whatever the conversion flags of
        ``torch.__future__``, because the scripted code holds these very tensors; new buffers are handed to it."""
        if recurse:
            for child in self.children():
                child._apply(fn)
        with torch.no_grad():
            for param in self._parameters.values():
                if param is not None:
                    param.data = fn(param)
                    if param.grad is not None:
                        param.grad.data = fn(param.grad)
            for name, value in self._buffers.items():
                if value is not None:
                    self._buffers[name] = fn(value)
                    setattr(self._ts_script, name, self._buffers[name])
        return self

    def extra_repr(self) -> str:
        return "torchscript: %s%s" % (self._ts_mode, " (%s)" % self._ts_note if self._ts_note else "")


_PROXY_CLASSES: Dict[str, type] = {}


def _proxy_for(script) -> ScriptProxy:
    kind = str(getattr(script, "original_name", "") or "ScriptModule")
    kind = kind if kind.isidentifier() else "ScriptModule"
    if kind not in _PROXY_CLASSES:
        _PROXY_CLASSES[kind] = type(kind, (ScriptProxy,), {"__module__": __name__})
    return _PROXY_CLASSES[kind](script)


def _calls_other_modules(script, method: str, seen: set) -> bool:
    seen.add(method)
    graph = script._c._get_method(method).graph
    own = next(iter(graph.inputs())).unique()
    for node in _walk(graph):
        if node.kind() == "prim::CallMethod":
            target = next(iter(node.inputs())).unique()
            if target != own:
                return True
            if node.s("name") not in seen and _calls_other_modules(script, node.s("name"), seen):
                return True
        elif node.kind() == "prim::fork":
            return True  # a forked call of a sub-module: run opaquely, not as a leaf
    return False


def _plan(proxy: ScriptProxy, interpret: bool, cu) -> None:
    """Decide how each proxy runs and compile the graphs of the interpreted ones (top-down)."""
    script = proxy._ts_script
    entries = [name for name in script._c._method_names() if _FORWARD.match(name)]
    if not entries:
        proxy._ts_mode = "container"
    elif not interpret:
        proxy._ts_mode, proxy._ts_note = "opaque", "interpretation switched off"
    elif not any(_calls_other_modules(script, name, set()) for name in entries):
        proxy._ts_mode = "leaf"
    else:
        programs: Dict[str, _Program] = {}
        todo = list(entries)
        try:
            while todo:
                name = todo.pop()
                if name not in programs:
                    method = script._c._get_method(name)
                    programs[name] = _Program(method, cu)
                    own = next(iter(method.graph.inputs())).unique()
                    todo += [n.s("name") for n in _walk(method.graph)
                             if n.kind() == "prim::CallMethod" and next(iter(n.inputs())).unique() == own]
            proxy._ts_programs.update(programs)
            proxy._ts_mode = "interpreted"
        except _Unsupported as exc:
            proxy._ts_mode = "opaque"
            proxy._ts_note = ("its TorchScript uses %s, which SegHiResCAM does not run step by step; it runs as one "
                              "call" % exc)
    for child in proxy.children():
        _plan(child, interpret, cu)


def script_to_eager(script: torch.jit.ScriptModule, interpret: bool = True, functions=None) -> ScriptProxy:
    """The eager proxy tree of a scripted or traced module (see the module docstring).

    Args:
        script: a ``torch.jit.ScriptModule`` (e.g. from ``torch.jit.load``).
        interpret: ``False`` runs the whole module as one opaque call (no explainable layer; for predictions
            if the interpreter ever fails on a file).
        functions: the ``torch._C.CompilationUnit`` the module was loaded into (:func:`jit_load`), where its free
            functions (``prim::CallFunction``) are found; by default, this process's (for modules scripted here).
    """
    if not isinstance(script, torch.jit.ScriptModule):
        raise ModelError("expected a TorchScript module, got %s" % type(script).__name__)
    proxy = _proxy_for(script)
    _plan(proxy, interpret, functions)
    return proxy


def torchscript_layers(network: nn.Module) -> List[Dict[str, Any]]:
    """How each sub-module of a proxy tree runs: ``name``, ``kind``, ``mode``, ``hookable`` (its forward hooks
    fire when the model runs) and ``note`` (why not)."""
    rows: List[Dict[str, Any]] = []

    def visit(module, name, blocker):
        mode = getattr(module, "_ts_mode", "eager")
        note = blocker or {"opaque": getattr(module, "_ts_note", ""),
                           "container": "no forward in the TorchScript file (a container such as ModuleList, or a "
                                        "module the trace never called)"}.get(mode, "")
        if name:
            rows.append({"name": name, "kind": type(module).__name__, "mode": mode,
                         "hookable": not blocker and mode != "container", "note": note})
        if not blocker and mode == "opaque":
            blocker = "runs inside the opaque module %r (%s)" % (name or "<root>", module._ts_note)
        elif not blocker and mode == "leaf":
            blocker = "never called by its parent's TorchScript code"
        for child_name, child in module.named_children():
            visit(child, "%s.%s" % (name, child_name) if name else child_name, blocker)

    visit(network, "", "")
    return rows


_GRAPH_ACTIVATIONS = {"aten::sigmoid": "sigmoid", "aten::softmax": "softmax", "aten::_softmax": "softmax"}


def graph_final_activation(script: torch.jit.ScriptModule, depth: int = 8):
    """``(kind, operator)`` when the scripted ``forward`` returns the result of a sigmoid/softmax (directly, in a
    returned tuple/list, or as the return of a sub-module it calls last), else ``None``: the static view of what
    an opaque proxy computes (its graph is not replayed, so :mod:`SegHiResCAMLib.engine.activation` cannot see
    it run)."""
    try:
        graph = script.graph
    except (AttributeError, RuntimeError):
        return None
    values = list(graph.return_node().inputs())
    while values and depth > 0:
        node = values.pop(0).node()
        kind = node.kind()
        if kind in _GRAPH_ACTIVATIONS:
            return _GRAPH_ACTIVATIONS[kind], kind
        if kind in ("prim::TupleConstruct", "prim::ListConstruct"):
            values = list(node.inputs())[:1] + values  # the first output: the full-resolution head by convention
        elif kind == "prim::CallMethod" and node.s("name") == "forward":
            owner = next(iter(node.inputs())).node()
            if owner.kind() == "prim::GetAttr":
                child = getattr(script, owner.s("name"), None)
                if isinstance(child, torch.jit.ScriptModule):
                    return graph_final_activation(child, depth - 1)
            return None
        depth -= 1
    return None
