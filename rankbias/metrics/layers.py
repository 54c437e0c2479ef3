"""The named 2-D weight matrices of any model, with the paper's default selection.

- `nn.Linear`: the weight as it is (out x in).
- `nn.Conv1d/2d/3d`: the kernel reshaped to out x (in * prod(kernel)), as in the paper.
- `nn.MultiheadAttention`: the packed in-projection split into Q, K and V
  (`<name>.in_proj_weight:q` ...); the out-projection is an ordinary Linear.
- An attention module with separate `q_proj`, `k_proj`, `v_proj`, `o_proj` Linear layers
  (rankbias's transformer): four ordinary Linear matrices. `attention_layers` finds both
  kinds with their head layout (for the per-head products of metrics/attention.py).
- A bare state_dict: every >= 2-D tensor whose key ends in "weight", conv kernels reshaped.

The paper averages the rank over the *hidden* matrices: the final classifier (here: the
last `nn.Linear` registered in the model) and 1x1 shortcut convolutions (a 1x1 conv whose
name contains "shortcut" or "downsample", torchvision's name) are left out by default. A
state_dict gets the same selection from its keys and shapes (its order is the order the
modules were registered in): the classifier is its last 2-D weight (attention projections
aside), a shortcut a 1x1 kernel under a "shortcut"/"downsample" key. On the authors'
CIFAR ResNet-18 that leaves the 17 matrices their `eval_ranks` averages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rankbias.metrics.spectral import as_matrix

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHORTCUT_WORDS = ("shortcut", "downsample")


def _is_shortcut(name: str, module: nn.Module) -> bool:
    one_by_one = all(k == 1 for k in module.kernel_size)
    return one_by_one and any(word in name for word in _SHORTCUT_WORDS)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attention_out_projections(model: nn.Module) -> set[str]:
    """Module names of the out-projections of `model`'s attention blocks (nn.Linear
    modules that are part of an attention, never a classifier)."""
    return {_join(name, "out_proj") for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)}


def attention_matrix_names(name: str, module: nn.MultiheadAttention) -> dict[str, str]:
    """{"q", "k", "v", "out": matrix name} of the attention block `name`, as
    `weight_matrices` names them (a packed in-projection as "<name>.in_proj_weight:q")."""
    if module._qkv_same_embed_dim:
        parts = {p: f"{_join(name, 'in_proj_weight')}:{p}" for p in "qkv"}
    else:
        parts = {p: _join(name, f"{p}_proj_weight") for p in "qkv"}
    return {**parts, "out": _join(name, "out_proj.weight")}


@dataclass(frozen=True)
class AttentionLayout:
    """One attention layer: its W_Q, W_K, W_V, W_O as `weight_matrices` names them (keys
    "q", "k", "v", "o") and its heads (query heads, key/value heads, head size)."""

    names: dict[str, str]
    n_heads: int
    n_kv_heads: int
    head_dim: int


def attention_layers(model: nn.Module) -> dict[str, AttentionLayout]:
    """The attention layers of `model` by module name: every nn.MultiheadAttention, and every
    module with nn.Linear `q_proj`, `k_proj`, `v_proj`, `o_proj` and an int `num_heads`
    (optionally `num_kv_heads` for grouped-query attention, and `head_dim`)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            parts = attention_matrix_names(name, module)
            parts["o"] = parts.pop("out")
            layers[name] = AttentionLayout(parts, module.num_heads, module.num_heads,
                                           module.head_dim)
        elif isinstance(getattr(module, "num_heads", None), int) and all(
                isinstance(getattr(module, f"{p}_proj", None), nn.Linear) for p in "qkvo"):
            heads = module.num_heads
            layers[name] = AttentionLayout(
                {p: _join(name, f"{p}_proj.weight") for p in "qkvo"}, heads,
                getattr(module, "num_kv_heads", None) or heads,
                getattr(module, "head_dim", None) or module.q_proj.out_features // heads)
    return layers


def classifier_name(model: nn.Module) -> str | None:
    """The module name of the final classifier: the last `nn.Linear` registered.

    Attention out-projections are Linear modules too but are never the classifier.
    """
    last = None
    attention_outputs = attention_out_projections(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in attention_outputs:
            last = name
    return last


def _split_in_projection(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of the packed in-projection `name` (rows [Q; K; V]), named "<name>:q" ..."""
    return {f"{name}:{p}": part for p, part in zip("qkv", weight.chunk(3, dim=0))}


def parameter_of(name: str) -> str:
    """The parameter that holds the matrix `name` (a `weight_matrices` name)."""
    return name.partition(":")[0]


def matrix_of(name: str, parameter: torch.Tensor) -> torch.Tensor:
    """The matrix `name` (a `weight_matrices` name) out of its whole parameter (or that
    parameter's gradient): a packed in-projection's part, a convolution as (out, in*kh*kw)."""
    if ":" in name:  # a part of a packed attention in-projection
        return _split_in_projection(parameter_of(name), parameter)[name]
    return as_matrix(parameter)


def weight_matrices(source: nn.Module | Mapping[str, torch.Tensor],
                    include_classifier: bool = False,
                    include_shortcuts: bool = False) -> dict[str, torch.Tensor]:
    """Named 2-D weight matrices of a model (paper's selection by default) or a state_dict.

    Names are the state_dict keys of the weights ("features.0.weight"), with ":q", ":k",
    ":v" appended for the parts of an attention in-projection. The matrices are views of
    the live parameters (detached), so calling this is cheap.

    A model with a single matrix keeps it even when it is the classifier: otherwise there
    would be nothing to measure.
    """
    if isinstance(source, nn.Module):
        return _module_matrices(source, include_classifier, include_shortcuts)
    if isinstance(source, Mapping):
        return _state_dict_matrices(source, include_classifier, include_shortcuts)
    raise TypeError(f"expected an nn.Module or a state_dict, got {type(source).__name__}")


def _module_matrices(model: nn.Module, include_classifier: bool,
                     include_shortcuts: bool) -> dict[str, torch.Tensor]:
    head = classifier_name(model)
    matrices: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name == head and not include_classifier:
                continue
            matrices[_join(name, "weight")] = module.weight.detach()
        elif isinstance(module, CONV):
            if _is_shortcut(name, module) and not include_shortcuts:
                continue
            matrices[_join(name, "weight")] = as_matrix(module.weight.detach())
        elif isinstance(module, nn.MultiheadAttention):
            if module._qkv_same_embed_dim:
                matrices.update(_split_in_projection(_join(name, "in_proj_weight"),
                                                     module.in_proj_weight.detach()))
            else:
                names = attention_matrix_names(name, module)
                matrices.update({names[p]: getattr(module, f"{p}_proj_weight").detach()
                                 for p in "qkv"})
    if not matrices and head is not None:
        return _module_matrices(model, True, include_shortcuts)
    return matrices


def _state_dict_matrices(state: Mapping[str, torch.Tensor], include_classifier: bool,
                         include_shortcuts: bool) -> dict[str, torch.Tensor]:
    weights = {key: value.detach() for key, value in state.items()
               if isinstance(value, torch.Tensor) and value.ndim >= 2 and key.endswith("weight")}
    linear = [k for k, v in weights.items() if v.ndim == 2 and not k.endswith("proj_weight")
              and not k.endswith("out_proj.weight")]
    head = linear[-1] if linear else None
    matrices: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key == head and not include_classifier:
            continue
        one_by_one = value.ndim >= 3 and all(k == 1 for k in value.shape[2:])
        if one_by_one and any(w in key for w in _SHORTCUT_WORDS) and not include_shortcuts:
            continue
        if key.endswith("in_proj_weight") and value.shape[0] == 3 * value.shape[1]:
            matrices.update(_split_in_projection(key, value))
        else:
            matrices[key] = as_matrix(value)
    if not matrices and head is not None:
        return _state_dict_matrices(state, True, include_shortcuts)
    return matrices


def conv_operator_singular_values(weight: torch.Tensor,
                                  input_size: int | tuple[int, int]) -> torch.Tensor:
    """Singular values of the full linear operator of a stride-1 Conv2d with circular padding.

    Sedghi, Gupta, Long (2019): the operator is block-diagonalized by the 2-D DFT, so its
    singular values are those of the c_out x c_in matrices of the kernel's FFT at every
    frequency. Returned sorted descending (c_out*c_in... up to n*n*min(c_out, c_in) values).
    The "FFT rank" of the layer is `rank_from_singular_values` of this vector.
    """
    if weight.ndim != 4:
        raise ValueError("expected a Conv2d kernel (out, in, kh, kw)")
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if weight.shape[2] > h or weight.shape[3] > w:
        raise ValueError(f"kernel {tuple(weight.shape[2:])} larger than input {(h, w)}")
    spectrum = torch.fft.fft2(weight.detach().to(torch.float64), s=(h, w))  # (out, in, h, w)
    per_frequency = spectrum.permute(2, 3, 0, 1)  # (h, w, out, in)
    sigma = torch.linalg.svdvals(per_frequency).flatten()
    return torch.sort(sigma, descending=True).values
