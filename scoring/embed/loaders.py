"""The torch-module model loaders: open_clip (images or text), timm and torchvision (images),
module:factory (either). Each scheme has a driver check that loads no weights (`check_*`) and
a worker build (`build_*`) returning `(model, preprocess, forward or None)` for TorchEmbedder.
They receive the `ModelSpec` that `scoring.embed.registry.parse_spec` made."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from scoring.errors import BadConfig, first_line

if TYPE_CHECKING:
    from scoring.embed.registry import ModelSpec


def need(spec: ModelSpec, package: str, pip_name: str | None = None):
    """The imported `package`, or a BadConfig naming the pip package to install."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BadConfig(
            f"model '{spec.text}': the package '{package}' is not installed "
            f"(pip install {pip_name or package})"
        ) from None


# -- open_clip -----------------------------------------------------------------------------------
def check_open_clip(spec: ModelSpec):
    return need(spec, "open_clip", "open_clip_torch")


def build_open_clip(spec: ModelSpec, kind: str):
    oc = check_open_clip(spec)
    try:
        model, _, pre = oc.create_model_and_transforms(spec.name, pretrained=spec.weights)
    except Exception as e:  # noqa: BLE001
        raise BadConfig(
            f"model '{spec.text}': open_clip could not load it: {first_line(e)}"
        ) from None
    if kind == "image":
        return model, pre, model.encode_image
    tok = oc.get_tokenizer(spec.name)
    return model, tok, model.encode_text


# -- timm ----------------------------------------------------------------------------------------
def check_timm(spec: ModelSpec):
    return need(spec, "timm")


def build_timm(spec: ModelSpec, kind: str):
    timm = check_timm(spec)
    if kind != "image":
        raise BadConfig(f"model '{spec.text}': timm models embed images, not text")
    try:
        if spec.weights:
            model = timm.create_model(
                spec.name,
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": spec.weights},
            )
        else:
            model = timm.create_model(spec.name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise BadConfig(f"model '{spec.text}': timm could not load it: {first_line(e)}") from None
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, timm.data.create_transform(**cfg), None


# -- torchvision ---------------------------------------------------------------------------------
def check_torchvision(spec: ModelSpec):
    return need(spec, "torchvision")


def build_torchvision(spec: ModelSpec, kind: str):
    tv = check_torchvision(spec)
    import torch

    name, weights = spec.name, spec.weights
    if kind != "image":
        raise BadConfig(f"model '{spec.text}': torchvision models embed images, not text")
    try:
        model = tv.models.get_model(name, weights=None)
    except Exception as e:  # noqa: BLE001
        raise BadConfig(f"model '{spec.text}': torchvision has no model '{name}' ({e})") from None
    pre = None
    if weights and os.path.exists(weights):
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    elif weights:
        try:
            w = tv.models.get_model_weights(name)[weights]
        except KeyError:
            raise BadConfig(
                f"model '{spec.text}': unknown weights '{weights}' for {name}"
            ) from None
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        if not os.path.exists(cached):
            raise BadConfig(
                f"model '{spec.text}': weights file {cached} is not in the torch hub cache "
                "(nothing is downloaded; give a local file as @PATH)"
            )
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        pre = w.transforms()
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())
            break
    if pre is None:
        from torchvision import transforms as T

        pre = T.Compose(
            [
                T.Resize(256),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
    return model, pre, None


# -- module:factory ------------------------------------------------------------------------------
def check_factory(spec: ModelSpec):
    """The factory callable: its module imports and names a callable (nothing is called)."""
    try:
        mod = importlib.import_module(spec.name)
    except ImportError as e:
        raise BadConfig(f"model '{spec.text}': cannot import module '{spec.name}' ({e})") from None
    fn = getattr(mod, spec.factory, None)
    if not callable(fn):
        raise BadConfig(
            f"model '{spec.text}': module '{spec.name}' has no callable '{spec.factory}'"
        )
    return fn


def build_factory(spec: ModelSpec, kind: str):
    model, pre = load_factory(spec)
    return model, pre, None


def load_factory(spec: ModelSpec | str):
    """`module:factory` -> (model, preprocess).

    Contract: `module` is importable on every worker (installed, or on PYTHONPATH);
    `factory()` is called once per worker with no arguments and returns a 2-tuple
    `(model, preprocess)`: `model` a `torch.nn.Module` (moved to the worker's device and put in
    eval mode here) whose output for a batch is a float Tensor [batch, d] (or a tuple whose
    first element is one); `preprocess` for images takes one PIL image (RGB) and returns a
    Tensor [C, H, W] of a fixed shape; for text it takes a list of strings and returns a
    Tensor, or a mapping of Tensors passed to the model as keyword arguments.
    """
    if isinstance(spec, str):
        from scoring.embed.registry import parse_spec

        spec = parse_spec(spec, "image")
        if spec.scheme != "factory":
            raise BadConfig(f"model '{spec.text}': expected module:factory")
    got = check_factory(spec)()
    if not (isinstance(got, tuple) and len(got) == 2):
        raise BadConfig(
            f"model '{spec.text}': the factory must return a tuple (torch.nn.Module, "
            f"preprocess), got {type(got).__name__}"
        )
    return got
