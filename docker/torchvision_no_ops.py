"""Let a torchvision whose C extension cannot load (a CUDA wheel beside CPU torch) import without its ops.

Installed only by ``docker/Dockerfile.slim`` with ``TORCHVISION_OPS=optional``, i.e. where no CPU build of
torchvision can be had (PyPI's Linux x86_64 torchvision wheels are CUDA builds; the matching CPU builds are on
PyTorch's own index). A ``.pth`` line imports this module at interpreter start; it costs nothing until
``torchvision`` is imported.

Why it is needed: torchvision's ``_C`` extension links against ``libtorch_cuda.so``, which CPU torch lacks, so
it does not load and ``torchvision.extension._has_ops()`` is False. Everything else of torchvision is Python
(models, transforms), which is all excb uses on a CPU. But ``torchvision/_meta_registrations.py`` registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking ``_has_ops()``, and registering a fake
kernel for an operator that was never defined raises "operator torchvision::nms does not exist" at import.

What it does: just before torchvision is first imported, it defines those two operator schemas (no kernel).
Calling ``torchvision.ops.nms`` then fails with torchvision's own "Couldn't load custom C++ ops" error.
``roi_align``, which excb's batched multi-crop calls on the CPU too (excb/data/gpu_augment.py), has a pure-Python
version that torchvision runs under torch.compile when its ops are absent: that needs a C++ compiler, which the
CPU worker image has (docker/Dockerfile.slim, worker-base).
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # kept alive: a torch.library.Library drops its definitions when collected


def _define_schemas() -> None:
    global _LIBRARY
    import torch

    missing = []
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            missing.append(schema)
    if missing:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing:
            _LIBRARY.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            # torchvision loads its extension first; only when that fails are the schemas missing.
            import importlib.util

            spec = importlib.util.find_spec("torchvision")
            if spec is not None:
                _define_schemas_if_extension_fails(spec)
        except Exception:  # noqa: BLE001 (never break an import that would have worked)
            pass
        return None


def _define_schemas_if_extension_fails(spec) -> None:  # noqa: ANN001
    import os

    import torch

    ext = [os.path.join(p, "_C.so") for p in (spec.submodule_search_locations or [])]
    try:
        for path in ext:
            if os.path.exists(path):
                torch.ops.load_library(path)
                return
    except (ImportError, OSError):
        pass
    _define_schemas()


if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
