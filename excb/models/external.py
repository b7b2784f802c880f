"""Bring your own backbone: any torchvision or timm classification architecture by name.

``model.backbone=torchvision:resnet34`` or ``model.backbone=timm:convnext_tiny`` (LightlyTrain's spelling
``timm/convnext_tiny`` is read the same) builds the library's own module, untrained, with its classifier removed:
the backbone's output is the library's pre-logits feature. The module tree is the library's, so the weights a run
exports (``excb export --format torch``) load with ``strict=True`` into the constructor ``backbone.json`` names.

Per-stage features (``model.embedding=multiscale``) come from the libraries' own feature extraction, not from
hooks: timm's ``forward_intermediates`` and torchvision's ``create_feature_extractor`` on the stages named in
:data:`TORCHVISION_STAGES`. Where neither exists, multiscale is a config error that says so.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excb.errors import ConfigError
from excb.models.base import Backbone

LIBRARIES = ("torchvision", "timm")
MULTISCALE_STAGES = 3  # as excb.models.model.MULTISCALE_STAGES (that module imports this one)
# torchvision families whose stages have fixed module names: the last three, deepest last
TORCHVISION_STAGES: dict[str, tuple[str, ...]] = {
    "resnet": ("layer2", "layer3", "layer4"),
    "resnext": ("layer2", "layer3", "layer4"),
    "wide_resnet": ("layer2", "layer3", "layer4"),
    "convnext": ("features.3", "features.5", "features.7"),
    "regnet": ("trunk_output.block2", "trunk_output.block3", "trunk_output.block4"),
}


def split_arch(name: str) -> tuple[str, str] | None:
    """``"timm:convnext_tiny"`` -> ``("timm", "convnext_tiny")``; None for a built-in backbone name."""
    lib, sep, arch = name.partition(":")
    return (lib, arch) if sep and lib in LIBRARIES else None


def is_external(name: str) -> bool:
    return split_arch(name) is not None


@functools.lru_cache(maxsize=1)
def torchvision_names() -> frozenset[str]:
    """torchvision's classification architectures (what ``torchvision:NAME`` may name)."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def check_arch(name: str) -> str:
    """Normalise and check a ``model.backbone`` value naming a library architecture (raises ValueError)."""
    lib, arch = split_arch(name) or ("", "")
    if not arch:
        raise ValueError(f"{name!r}: name an architecture after the library, e.g. torchvision:resnet34")
    if lib == "torchvision" and arch not in torchvision_names():
        raise ValueError(f"torchvision has no classification model {arch!r} (torchvision.models.list_models())")
    if lib == "timm":
        try:
            import timm
        except ImportError:
            return name  # checked where the model is built (a control plane need not install timm)
        if not timm.is_model(arch):
            raise ValueError(f"timm has no model {arch!r} (timm.list_models())")
    return name


def torchvision_stages(arch: str) -> tuple[str, ...] | None:
    """The stage module names of a torchvision architecture, None when its family has none listed."""
    family = next((f for f in sorted(TORCHVISION_STAGES, key=len, reverse=True) if arch.startswith(f)), None)
    return TORCHVISION_STAGES[family] if family else None


def no_stages_reason(name: str) -> str:
    """Why ``model.embedding=multiscale`` is refused for ``name``, and what to write instead."""
    lib, arch = split_arch(name) or ("", name)
    if lib == "timm":
        return (f"it needs per-stage features and timm's {arch} has no forward_intermediates; use "
                "model.embedding=final")
    return (f"it needs per-stage features, named for torchvision's {', '.join(TORCHVISION_STAGES)} families only; "
            f"use model.embedding=final with {name}, or a timm: architecture")


def _pool(x: Tensor) -> Tensor:
    """A feature map [N, C, H, W] (or tokens [N, T, C]) -> [N, C] by averaging; a vector stays as it is."""
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
    return x.mean(1) if x.ndim == 3 else x


def _last_linear(model: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear`` (torchvision's classifier); its input is the pre-logits feature."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("model.backbone", "this torchvision model has no Linear classifier to remove")
    return names[-1]


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class LibraryBackbone(Backbone):
    """A torchvision or timm model as an ExCB backbone: ``forward`` -> pre-logits [N, embed_dim];
    ``stage_features`` -> pooled stages, the last = ``forward``'s. Its weights live under ``net.`` with the
    library's own names (:meth:`library_state_dict`)."""

    def __init__(self, name: str, image_size: int, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        lib, arch = split_arch(name) or ("", "")
        self.name, self.library, self.arch = name, lib, arch
        self.removed: str | None = None  # torchvision: the classifier replaced by nn.Identity
        self.create_kwargs: dict[str, Any] = {}  # timm: what timm.create_model was given beyond the name
        self.stage_names: tuple[str, ...] | None = None
        self.net = (self._build_timm(image_size, drop_path_rate) if lib == "timm"
                    else self._build_torchvision(drop_path_rate))
        self.stage_dims, self.embed_dim = self._probe(image_size)

    # -- building
    def _build_torchvision(self, drop_path_rate: float) -> nn.Module:
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor

        kwargs = {"stochastic_depth_prob": drop_path_rate} if drop_path_rate else {}
        try:
            model = torchvision.models.get_model(self.arch, weights=None, **kwargs)
        except TypeError as exc:
            raise ConfigError("model.drop_path_rate", f"torchvision's {self.arch} takes no stochastic depth") from exc
        self.removed = _last_linear(model)
        _set_module(model, self.removed, nn.Identity())
        stages = torchvision_stages(self.arch)
        if stages is None:
            return model
        self.stage_names = stages[:-1]
        nodes = {s: f"stage{i}" for i, s in enumerate(self.stage_names)} | {self.removed: "out"}
        return create_feature_extractor(model, return_nodes=nodes)  # same modules, same state-dict names

    def _build_timm(self, image_size: int, drop_path_rate: float) -> nn.Module:
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("model.backbone", f"{self.name} needs timm: pip install 'excb[timm]'") from exc
        if not timm.is_model(self.arch):
            raise ConfigError("model.backbone", f"timm has no model {self.arch!r} (timm.list_models())")
        kwargs: dict[str, Any] = {"num_classes": 0}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        cfg = timm.get_pretrained_cfg(self.arch)
        if cfg is not None and getattr(cfg, "fixed_input_size", False):
            # ViTs: position embeddings learnt for this input size, resampled for the student's local crops
            kwargs.update(img_size=image_size, dynamic_img_size=True)
        try:
            model = timm.create_model(self.arch, pretrained=False, **kwargs)
        except TypeError as exc:
            raise ConfigError("model.backbone", f"timm's {self.arch} rejected {kwargs}: {exc}") from exc
        self.create_kwargs = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
        return model

    def _probe(self, image_size: int, field: str = "augment.global_size") -> tuple[list[int], int]:
        """One eval-mode pass at ``image_size``: the output sizes, and a clear error where it is too small."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(1, 3, image_size, image_size)
                stages = self.stage_features(x) if self.has_stages else [self(x)]
        except Exception as exc:  # noqa: BLE001 - whatever the library raises, the fix is in the config
            raise ConfigError(field, f"{self.name} cannot run on {image_size} px images: "
                              f"{' '.join(str(exc).split())[:200]} (set {field} larger: most need >= 32)") from exc
        finally:
            self.train(was_training)
        dims = [int(s.shape[-1]) for s in stages]
        return dims, dims[-1]

    def check_size(self, image_size: int, field: str) -> None:
        """The student also sees local crops: refuse a size the architecture cannot take before training."""
        self._probe(image_size, field)

    # -- the backbone contract
    @property
    def has_stages(self) -> bool:
        if self.library == "timm":
            return hasattr(self.net, "forward_intermediates")
        return self.stage_names is not None

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out["out"] if isinstance(out, dict) else out

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """The last stages, average-pooled, then the pre-logits feature (``forward``'s) as the last."""
        if not self.has_stages:
            raise ConfigError("model.embedding", "multiscale: " + self.no_stages_reason())
        if self.library == "timm":
            net: Any = self.net  # a timm model: forward_intermediates / forward_head are its API
            final, inter = net.forward_intermediates(x, indices=MULTISCALE_STAGES, norm=False, output_fmt="NCHW")
            return [_pool(t) for t in inter[:-1]] + [net.forward_head(final, pre_logits=True)]
        out = self.net(x)
        return [_pool(out[f"stage{i}"]) for i in range(len(self.stage_names or ()))] + [out["out"]]

    def no_stages_reason(self) -> str:
        return no_stages_reason(self.name)

    # -- weights in the library's layout
    def constructor(self, image_size: int) -> str:
        """The third-party call whose model loads this backbone's library state dict with ``strict=True``."""
        if self.library == "timm":
            args = "".join(f", {k}={v!r}" for k, v in self.create_kwargs.items())
            return f"timm.create_model({self.arch!r}{args})"
        return f"torchvision.models.get_model({self.arch!r}) with {self.removed} = nn.Identity()"


def check_multiscale(backbone: nn.Module, kind: str) -> None:
    """``model.embedding=multiscale`` on a backbone without stages: one config error, at build time."""
    if kind == "multiscale" and isinstance(backbone, LibraryBackbone) and not backbone.has_stages:
        raise ConfigError("model.embedding", "multiscale: " + backbone.no_stages_reason())


NET_PREFIX = "net."


def to_library_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`LibraryBackbone` state dict -> the library model's own key names."""
    return {k.removeprefix(NET_PREFIX): v for k, v in state.items()}


def from_library_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {NET_PREFIX + k: v for k, v in state.items()}


__all__ = ["LibraryBackbone", "LIBRARIES", "TORCHVISION_STAGES", "split_arch", "is_external", "check_arch",
           "check_multiscale", "no_stages_reason", "torchvision_stages", "to_library_keys", "from_library_keys"]
