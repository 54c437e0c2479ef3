"""Models by name: `create_model("mlp-bn-10-100", (3, 32, 32), 10)`.

Every model takes any input shape -- (C, H, W) images, (C, L) or (L,) 1-D signals -- and
returns logits of shape (batch, num_classes). Conventions the rest of the toolkit relies on:
- the classifier is the LAST `nn.Linear` in `model.modules()` order;
- ResNet 1x1 shortcut convs have "shortcut" in their module name;
- attention uses `nn.MultiheadAttention` (Q, K, V stacked in `in_proj_weight`; the ViT), or
  separate `q_proj`, `k_proj`, `v_proj`, `o_proj` Linear modules with `num_heads` (the
  transformer);
- a model of token ids says so with `input_dtype = torch.int64` (`example_input`).
`model.spec` holds the name, input shape, class count and options that rebuild it.

    >>> list_models()
    ['convnet', 'mlp', 'mlp-5-500', 'mlp-bn-10-100', 'resnet18', 'transformer', 'vgg11',
     'vgg16', 'vit']
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rankbias.models.convnet import ConvNet, build_convnet
from rankbias.models.mlp import MLP, build_mlp
from rankbias.models.resnet import ResNet, build_resnet18
from rankbias.models.transformer import Transformer, build_transformer
from rankbias.models.vgg import VGG, build_vgg11, build_vgg16
from rankbias.models.vit import ViT, build_vit
from rankbias.utils import RankbiasError
from rankbias.validate import is_int

# name -> (builder, options the name fixes). Presets are the paper's named architectures.
MODELS: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "mlp": (build_mlp, {}),
    "mlp-bn-10-100": (build_mlp, dict(depth=10, width=100, batch_norm=True, activation="relu")),
    "mlp-5-500": (build_mlp, dict(depth=5, width=500, batch_norm=False, activation="relu")),
    "convnet": (build_convnet, {}),
    "resnet18": (build_resnet18, {}),
    "vgg11": (build_vgg11, {}),
    "vgg16": (build_vgg16, {}),
    "vit": (build_vit, {}),
    "transformer": (build_transformer, {}),
}

__all__ = [
    "MLP", "ConvNet", "MODELS", "ResNet", "Transformer", "VGG", "ViT", "create_model",
    "example_input", "list_models", "model_options", "normalize_options", "random_input",
]


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options `name` accepts, with their defaults (a preset's fixed ones left out)."""
    builder, fixed = _lookup(name)
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in fixed}


def normalize_options(name: str, options: dict) -> dict[str, object]:
    """Every option of model `name`, defaults filled in and values typed (1 -> 1.0 for a
    float option), in signature order: the one spelling of a model's options.

    Raises RankbiasError for an unknown option or a value of the wrong type.
    """
    builder, fixed = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        fixed_note = f" ({', '.join(fixed)} fixed by the preset)" if fixed else ""
        raise RankbiasError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
            f"valid: {', '.join(valid) or 'none'}{fixed_note}"
        )
    hints = typing.get_type_hints(builder)
    return {key: _check_type(name, key, options.get(key, default), hints[key])
            for key, default in valid.items()}


def create_model(
    name: str, input_shape: Sequence[int], num_classes: int, **options
) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (one example, no batch dimension).

    Raises RankbiasError, with a one-line message, for an unknown name, an unknown option,
    or an option of the wrong type or out of range.
    """
    builder, fixed = _lookup(name)
    options = {k: v for k, v in normalize_options(name, options).items() if k in options}
    shape = tuple(input_shape)
    if not shape or not all(is_int(s) and s >= 1 for s in shape):
        raise RankbiasError(f"input_shape must be positive integers, e.g. (1, 8, 8); got {shape}")
    if not is_int(num_classes) or num_classes < 1:
        raise RankbiasError(f"num_classes must be a positive integer; got {num_classes!r}")
    model = builder(shape, num_classes, **fixed, **options)
    model.spec = dict(name=name, input_shape=shape, num_classes=num_classes, options=options)
    return model


def example_input(model: nn.Module, shape: Sequence[int], batch: int = 1,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros of shape (batch, *shape) that `model` takes: token ids (int64) for a model whose
    `input_dtype` says so, else floats in the dtype of its parameters (for a forward pass
    that sizes or counts something)."""
    parameter = next(model.parameters(), None)
    dtype = getattr(model, "input_dtype", None) or (
        parameter.dtype if parameter is not None else torch.float32)
    device = device or (parameter.device if parameter is not None else "cpu")
    return torch.zeros(batch, *shape, dtype=dtype, device=device)


def random_input(model: nn.Module, shape: Sequence[int], *batch: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A random input of shape (*batch, *shape) for timing `model`: token ids drawn
    uniformly from its vocabulary for a model of tokens, else standard normal floats."""
    if getattr(model, "input_dtype", None) == torch.int64:
        return torch.randint(model.vocab, (*batch, *shape), device=device)
    return torch.randn(*batch, *shape, device=device)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], dict]:
    if name not in MODELS:
        raise RankbiasError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return MODELS[name]


def _check_type(name: str, key: str, value: object, hint: object) -> object:
    """Check `value` against the builder's annotation; ints are accepted for floats."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and is_int(value):
        return float(value)
    if any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in allowed):
        return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise RankbiasError(f"option {key}={value!r} of model {name!r} must be {names}")
