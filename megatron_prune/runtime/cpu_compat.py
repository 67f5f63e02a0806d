"""Let megatron-core run on a machine without CUDA, without changing torch for anyone else in the process.

megatron-core hard-codes CUDA in a handful of places: ``torch.cuda.current_device()`` as a device, ``torch.cuda``
RNG/stream/event/synchronize calls, literal ``device="cuda"`` in tensor factories, ``.cuda()`` on tensors and
modules, ``param.type() == 'torch.cuda.FloatTensor'`` asserts in its optimizer, and the CUDA RNG state helpers of
its tensor-parallel RNG tracker. On a CPU-only machine each is redirected to the CPU, **as megatron sees it only**:

1. megatron's view of the ``torch`` namespace. Every ``megatron.core`` module's global ``torch`` is replaced by
   :class:`MegatronTorch`, a module object that forwards every attribute to the real torch except ``cuda`` (the
   CPU stand-ins of :class:`MegatronCuda`, anything else is the real ``torch.cuda``) and the tensor factories
   (``device="cuda"`` becomes the CPU). The ``torch`` module itself, ``torch.cuda`` and every other library's
   ``torch`` are untouched. megatron modules imported later are scoped as they load (an import hook that acts on
   ``megatron.core.*`` names only).
2. Tensor methods (``t.cuda()``, ``t.type()``) cannot be scoped by a namespace. The megatron functions whose
   bytecode calls ``x.cuda(...)`` or ``x.type()`` on an object other than the ``torch`` module are wrapped: while
   one runs, a :class:`TensorMethodsOnCpu` torch-function mode is on the stack (pushed on entry, popped on exit,
   also on an exception), and nowhere else.
3. megatron's ``tensor_parallel.random._get/_set_cuda_rng_state`` are replaced (megatron's own module attributes).

Nothing of torch is patched and no function mode stays on the stack: after our code has run, ``torch.cuda.*``,
``torch.Tensor.type/cuda/to``, ``torch.nn.Module.cuda`` and the function-mode stack are what torch had.
It covers megatron-core 0.16 through 0.19 (what differs between those releases is detected in compat.py).
"""

from __future__ import annotations

import dis
import functools
import importlib.abc
import inspect
import sys
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

from megatron_prune.runtime.compat import megatron_rng_module

_CPU = torch.device("cpu")
_SCOPED_ATTR = "__megatron_prune_cpu_scope__"  # set on wrappers and on scoped modules
_lock = threading.RLock()
_applied = False


def _to_cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, an int index, a cuda torch.device) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


# ------------------------------------------------------------------------------------ 1. megatron's torch.cuda

class _CpuEvent:
    """A CUDA event on a machine where every op has finished when it returns: always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream on the CPU: work is synchronous, so waiting on another stream or event is a no-op.

    megatron-core 0.17+ DDP calls ``torch.cuda.current_stream().wait_event(...)`` on every gradient sync."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CPU_STREAM = _CpuStream()


class MegatronCuda(types.ModuleType):
    """``torch.cuda`` as megatron-core sees it on a CPU machine: the CUDA calls it makes, as CPU stand-ins.

    Any other attribute is the real ``torch.cuda``'s."""

    def __init__(self):
        super().__init__("torch.cuda", "torch.cuda as megatron-core sees it on the CPU (megatron_prune)")
        self.current_device = lambda: _CPU
        self.synchronize = lambda *a, **k: None
        self.set_device = lambda *a, **k: None
        self.device_count = lambda: 0
        self.manual_seed = lambda *a, **k: None
        self.manual_seed_all = lambda *a, **k: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.empty_cache = lambda: None
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.memory_reserved = lambda *a, **k: 0
        self.reset_peak_memory_stats = lambda *a, **k: None
        self.current_stream = lambda *a, **k: _CPU_STREAM
        self.default_stream = lambda *a, **k: _CPU_STREAM
        self.Stream = _CpuStream
        self.Event = _CpuEvent
        self.stream = lambda stream=None: _CPU_STREAM
        self.is_available = lambda: False  # also where MEGATRON_PRUNE_DEVICE=cpu runs a GPU machine on the CPU

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


# The torch functions that take ``device=``: megatron writes ``device="cuda"`` (or a cuda torch.device) in these.
_FACTORIES = frozenset("""
    tensor as_tensor empty empty_like empty_strided zeros zeros_like ones ones_like full full_like arange range
    linspace logspace eye rand rand_like randn randn_like randint randint_like randperm normal scalar_tensor
    tril_indices triu_indices sparse_coo_tensor frombuffer
""".split())


def _device_to_cpu(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class MegatronTorch(types.ModuleType):
    """The ``torch`` module as megatron-core sees it on a CPU machine (the global ``torch`` of its modules).

    Every attribute is the real torch's, looked up on each access (so a later patch of torch is seen), except
    ``cuda`` (:class:`MegatronCuda`) and the tensor factories, whose ``device=`` CUDA becomes the CPU."""

    def __init__(self):
        super().__init__("torch", "torch as megatron-core sees it on the CPU (megatron_prune)")
        self.cuda = MegatronCuda()
        self._factories = {}

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            wrapped = self._factories.get(name)
            if wrapped is None or wrapped.__wrapped__ is not value:
                wrapped = self._factories[name] = _device_to_cpu(value)
            return wrapped
        return value

    def __dir__(self):
        return dir(torch)


MEGATRON_TORCH = MegatronTorch()


# ------------------------------------------------------------------------- 2. Tensor methods inside megatron

def _is_tensor_type_query(func, args, kwargs) -> bool:
    return func is torch.Tensor.type and len(args) == 1 and not kwargs


class TensorMethodsOnCpu(TorchFunctionMode):
    """While a megatron function that calls tensor methods runs: ``t.cuda()`` is ``t``, ``t.type()`` names a CPU
    tensor as the CUDA one (megatron's optimizer asserts 'torch.cuda.FloatTensor'; ``t.type(dtype)`` still casts),
    ``t.to("cuda")`` and every ``device="cuda"`` argument mean the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_tensor_type_query(func, args, kwargs):
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _to_cpu_device(args[1]) is _CPU:
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


_depth = threading.local()


def _in_tensor_scope(fn):
    """``fn`` run with :class:`TensorMethodsOnCpu` on the function-mode stack (once, however deeply nested)."""

    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        if getattr(_depth, "n", 0):
            return fn(*args, **kwargs)
        _depth.n = 1
        try:
            with TensorMethodsOnCpu():
                return fn(*args, **kwargs)
        finally:
            _depth.n = 0

    setattr(scoped, _SCOPED_ATTR, True)
    return scoped


_NOT_PLAIN = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_OP = dis.opmap
_ATTR_OPS = {_OP[n] for n in ("LOAD_ATTR", "LOAD_METHOD") if n in _OP}
_CALL_OPS = {_OP[n] for n in ("PRECALL", "CALL") if n in _OP}
_SKIP_OPS = {_OP[n] for n in ("CACHE", "NOP") if n in _OP}
_GLOBAL, _NAME, _EXTENDED = _OP["LOAD_GLOBAL"], _OP["LOAD_NAME"], _OP["EXTENDED_ARG"]
_ATTR_SHIFT = 1 if sys.version_info >= (3, 12) else 0  # 3.12+: LOAD_ATTR's arg is namei << 1 | method flag
_GLOBAL_SHIFT = 1 if sys.version_info >= (3, 11) else 0  # 3.11+: LOAD_GLOBAL's arg is namei << 1 | NULL flag


def _ops(code: types.CodeType) -> list:
    """``(opcode, arg)`` of ``code``'s instructions (EXTENDED_ARG folded, CACHE entries dropped): what dis gives,
    without building its Instruction objects (10x faster over all of megatron)."""
    raw, out, ext = code.co_code, [], 0
    for i in range(0, len(raw), 2):
        op, arg = raw[i], raw[i + 1] | ext
        if op == _EXTENDED:
            ext = arg << 8
            continue
        ext = 0
        if op not in _SKIP_OPS:
            out.append((op, arg))
    return out


def calls_tensor_methods(code: types.CodeType) -> bool:
    """Whether ``code`` (or a comprehension/lambda in it) calls ``x.cuda(...)`` or ``x.type()`` on something that
    is not the ``torch`` module (``torch.cuda`` is megatron's namespace view, ``x.device.type`` is no call)."""
    if any(isinstance(c, types.CodeType) and calls_tensor_methods(c) for c in code.co_consts):
        return True
    names = code.co_names
    if "cuda" not in names and "type" not in names:
        return False
    ops = _ops(code)
    for i, (op, arg) in enumerate(ops):
        if op not in _ATTR_OPS:
            continue
        name = names[arg >> _ATTR_SHIFT if op == _OP["LOAD_ATTR"] else arg]
        if name == "cuda":
            prev_op, prev_arg = ops[i - 1] if i else (None, 0)
            on_torch = (prev_op == _GLOBAL and names[prev_arg >> _GLOBAL_SHIFT] == "torch") or (
                prev_op == _NAME and names[prev_arg] == "torch")
            if not on_torch:
                return True
        elif name == "type" and i + 1 < len(ops) and ops[i + 1][0] in _CALL_OPS and ops[i + 1][1] == 0:
            return True
    return False


def _wrap_if_needed(fn, replaced: dict):
    if not isinstance(fn, types.FunctionType) or getattr(fn, _SCOPED_ATTR, False):
        return None
    code = fn.__code__
    if code.co_flags & _NOT_PLAIN or not calls_tensor_methods(code):
        return None
    wrapped = _in_tensor_scope(fn)
    replaced[id(fn)] = (fn, wrapped)
    return wrapped


def _scope_tensor_methods(module, replaced: dict) -> None:
    """Wrap the functions and methods defined in ``module`` that call tensor methods (see _in_tensor_scope)."""
    name = module.__name__
    for attr, value in list(vars(module).items()):
        if isinstance(value, types.FunctionType) and value.__module__ == name:
            wrapped = _wrap_if_needed(value, replaced)
            if wrapped is not None:
                setattr(module, attr, wrapped)
        elif isinstance(value, type) and value.__module__ == name and not issubclass(value, torch.autograd.Function):
            for key, member in list(vars(value).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    wrapped = _wrap_if_needed(member.__func__, replaced)
                    if wrapped is not None:
                        setattr(value, key, type(member)(wrapped))
                else:
                    wrapped = _wrap_if_needed(member, replaced)
                    if wrapped is not None:
                        setattr(value, key, wrapped)


# ------------------------------------------------------------------------------ scoping megatron's modules

def _megatron_modules() -> list:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "megatron.core" or n.startswith("megatron.core."))]


def _rebind(modules, replaced: dict) -> None:
    """Names bound by ``from x import f`` elsewhere in megatron point at the scoped versions too.

    ``replaced`` maps ``id(original)`` to ``(original, replacement)`` (ids: module values need not be hashable)."""
    if not replaced:
        return
    for module in modules:
        d = vars(module)
        for attr, value in list(d.items()):
            hit = replaced.get(id(value))
            if hit is not None and hit[0] is value:
                d[attr] = hit[1]


def _rng_stand_ins() -> dict:
    tp_random = megatron_rng_module()
    return {id(f): (f, new) for f, new in [(tp_random._get_cuda_rng_state, _cpu_rng_state),
                                           (tp_random._set_cuda_rng_state, _set_cpu_rng_state)]}


def _cpu_rng_state(device=-1, clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


_replaced: dict = {}  # every megatron function replaced so far: id(original) -> (original, replacement)


def _scope_module(module) -> None:
    """Give one megatron.core module the CPU view: its ``torch`` global, its tensor-method-calling functions."""
    if vars(module).get(_SCOPED_ATTR):
        return
    if vars(module).get("torch") is torch:
        module.torch = MEGATRON_TORCH
    new: dict = {}
    _scope_tensor_methods(module, new)
    _replaced.update(new)
    _rebind([module], _replaced)
    if new:
        _rebind(_megatron_modules(), new)
    setattr(module, _SCOPED_ATTR, True)


class _ScopingLoader(importlib.abc.Loader):
    """Wraps a megatron.core module's loader: the module gets the CPU view as soon as it has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            _scope_module(module)

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Scopes megatron.core modules imported after the layer was applied (acts on no other name)."""

    def find_spec(self, name, path, target=None):
        if name != "megatron.core" and not name.startswith("megatron.core."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ScopingLoader(spec.loader)
                return spec
        return None


_IMPORT_HOOK = _MegatronImportHook()


def apply_cpu_compat() -> bool:
    """Give megatron-core (and only megatron-core) its CPU view of torch. Returns True when applied.

    Idempotent; a no-op when this process runs on the GPU (runtime.device.on_gpu()).
    """
    global _applied
    from megatron_prune.runtime.device import on_gpu

    if _applied:
        return True
    if on_gpu():
        return False
    with _lock:
        import megatron.core  # noqa: F401

        stand_ins = _rng_stand_ins()
        tp_random = megatron_rng_module()
        tp_random._get_cuda_rng_state = _cpu_rng_state
        tp_random._set_cuda_rng_state = _set_cpu_rng_state
        _replaced.update(stand_ins)
        if _IMPORT_HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _IMPORT_HOOK)
        for module in _megatron_modules():
            _scope_module(module)
        _rebind(_megatron_modules(), _replaced)
        _applied = True
    return True
