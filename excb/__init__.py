"""ExCB: self-supervised pretraining with explicit cluster balancing (ECCV 2024), end to end.

``excb.train``, ``excb.export_onnx``, ``excb.export_weights``, ``excb.embed`` and ``excb.TrainedRun`` are the Python
API (excb/api.py), imported on first use so that ``import excb`` stays light.
"""

from typing import Any

from excb.version import __version__ as __version__  # re-exported

_API = ("train", "export_onnx", "export_weights", "embed", "TrainedRun")


def __getattr__(name: str) -> Any:
    if name in _API:
        from excb import api  # lazy, on first use: api imports torch, ``import excb`` does not

        return getattr(api, name)
    raise AttributeError(f"module 'excb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
