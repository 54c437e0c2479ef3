"""Which tensors of a checkpoint are weight matrices, what each is for, and how transformers
store them: roles, GPT-2's Conv1D, fused q/k/v projections, attention layers.

    rankbias analyze gpt2/ --split-qkv --attention-products

- **Roles** come from the names Hugging Face and PyTorch models use (`role_of`):
  attention_q/k/v/o, attention_qkv (a fused projection), mlp_in, mlp_gate, mlp_out,
  embedding, lm_head, classifier, conv, shortcut, linear.
- **Conv1D.** GPT-2 stores its `c_attn`, `c_proj`, `c_fc` weights in x out (transformers'
  Conv1D); they are reported as the layer's (out, in) matrix. Known from config.json's
  model_type, or, without one, from a `c_attn` weight of shape (d, 3d) (nanoGPT's Linear
  one is (3d, d)).
- **Fused projections** (`c_attn`, `qkv`, `Wqkv`, `qkv_proj`, `query_key_value`) are split
  into `<name>.q/.k/.v` with --split-qkv, by the layout of their rows (`fused_rows`);
  nn.MultiheadAttention's `in_proj_weight` is always split, as `<name>:q/:k/:v` (0.1).
- **The average** covers the hidden matrices. Left out, and not read unless --all: the
  embeddings, the output head (lm_head), a classifier (by name; in a checkpoint without
  transformer names, the last 2-D weight, the paper's rule) and 1x1 shortcut convs.
  Every tensor not analyzed is in the plan's `skipped` list with its reason.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rankbias.analyze.sources import Entry
from rankbias.metrics.spectral import as_matrix
from rankbias.utils import RankbiasError, natural_key

_Q = {"q_proj", "query", "q", "wq", "q_lin", "to_q"}
_K = {"k_proj", "key", "k", "wk", "k_lin", "to_k"}
_V = {"v_proj", "value", "v", "wv", "v_lin", "to_v"}
_QKV = {"c_attn", "query_key_value", "qkv", "Wqkv", "qkv_proj"}
_O = {"o_proj", "out_proj", "o", "wo", "out_lin", "to_out", "c_proj", "dense", "proj"}
_MLP_GATE = {"gate_proj", "w1"}
_MLP_IN = {"c_fc", "fc1", "up_proj", "w3", "dense_h_to_4h", "fc_in", "lin1", "wi", "w_in"}
_MLP_OUT = {"c_proj", "fc2", "down_proj", "w2", "dense_4h_to_h", "fc_out", "lin2", "wo"}
_LM_HEAD = {"lm_head", "embed_out", "decoder"}
_CLASSIFIER = {"classifier", "score"}
_CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_SHORTCUT_WORDS = ("shortcut", "downsample")
LEFT_OUT = {"embedding": "embedding", "lm_head": "output head (lm_head)",
            "classifier": "classifier", "shortcut": "1x1 shortcut convolution"}
FILTERED = "filtered out by --include/--exclude"


def role_of(name: str, ndim: int = 2, shape: Sequence[int] = ()) -> str:
    """The role of weight tensor `name` in its model, from the names it is known by."""
    parts = name.split(".")
    tensor, module, ancestors = parts[-1], (parts[-2] if len(parts) > 1 else ""), parts[:-2]
    words = [a.lower() for a in ancestors]
    in_attention = any("attn" in w or "attention" in w for w in words)
    if ndim >= 3:
        one_by_one = all(k == 1 for k in shape[2:])
        return "shortcut" if one_by_one and any(w in name for w in _SHORTCUT_WORDS) else "conv"
    if tensor == "in_proj_weight" or module in _QKV:
        return "attention_qkv"
    for part, names in (("q", _Q), ("k", _K), ("v", _V)):
        if tensor == f"{part}_proj_weight" or (module in names and
                                               (in_attention or len(module) > 1)):
            return f"attention_{part}"
    if module in _LM_HEAD or (module == "output" and not ancestors):
        return "lm_head"
    if "emb" in module.lower() or module in ("wte", "wpe", "shared"):
        return "embedding"
    if in_attention and module in _O:
        return "attention_o"
    if module in _MLP_GATE:
        return "mlp_gate"
    if module in _MLP_IN or (module == "dense" and words[-1:] == ["intermediate"]):
        return "mlp_in"
    if module in _MLP_OUT or (module == "dense" and words[-1:] == ["output"]):
        return "mlp_out"
    if module in _CLASSIFIER:
        return "classifier"
    return "linear"


def _module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else ""


# --- the head layout and the rows of a fused projection ----------------------------------------
def _first(config: Mapping, *keys: str) -> int | None:
    for key in keys:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def config_heads(config: Mapping) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) from a Hugging Face config.json (or nanoGPT's
    model_args); None when it does not say."""
    n_heads = _first(config, "num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads")
    if n_heads is None:
        return None
    if config.get("multi_query") and not config.get("new_decoder_architecture"):
        n_kv = 1  # Falcon-7B, GPT-BigCode: one key/value head
    else:
        n_kv = _first(config, "num_key_value_heads", "n_kv_heads", "num_kv_heads",
                      "multi_query_group_num") or n_heads
    hidden = _first(config, "hidden_size", "n_embd", "d_model", "dim")
    head_dim = _first(config, "head_dim", "kv_channels", "d_kv") or (
        hidden // n_heads if hidden else None)
    return (n_heads, n_kv, head_dim) if head_dim else None


def fused_layout(module: str, tensor: str, config: Mapping) -> str:
    """How a fused projection's rows hold q, k and v: "thirds" (in_proj_weight),
    "concatenated" ([q; k; v], the usual), "per_head" ([q_h; k_h; v_h] for each head:
    GPT-NeoX, Bloom) or "per_group" (each kv group's queries, then its k and v: Falcon's
    new decoder)."""
    if tensor == "in_proj_weight":
        return "thirds"
    if module != "query_key_value":
        return "concatenated"
    model_type = config.get("model_type")
    if model_type in ("gpt_neox", "bloom", "persimmon"):
        return "per_head"
    if model_type == "falcon":
        if config.get("new_decoder_architecture"):
            return "per_group"
        return "concatenated" if config.get("multi_query") else "per_head"
    if model_type == "chatglm":
        return "concatenated"
    raise RankbiasError(f"cannot split query_key_value of model_type {model_type!r}: its row "
                        "layout is known for gpt_neox, bloom, persimmon, falcon and chatglm "
                        "(put the model's config.json beside the checkpoint); run without "
                        "--split-qkv / --attention-products")


def fused_rows(rows: int, layout: str, heads: tuple[int, int, int] | None
               ) -> dict[str, tuple[tuple[int, int], ...]]:
    """{"q": row ranges, "k": ..., "v": ...} of a fused projection with `rows` rows."""
    if layout in ("thirds", "concatenated") and (heads is None or layout == "thirds"):
        if rows % 3:
            raise RankbiasError(f"a fused q/k/v projection of {rows} rows does not split in "
                                "three: put the model's config.json (its heads) beside it")
        third = rows // 3
        return {p: ((i * third, (i + 1) * third),) for i, p in enumerate("qkv")}
    if heads is None:
        raise RankbiasError("splitting this fused projection needs the head layout: put the "
                            "model's config.json beside the checkpoint")
    n_heads, n_kv, hd = heads
    if layout == "concatenated":
        q, kv = n_heads * hd, n_kv * hd
        parts = {"q": ((0, q),), "k": ((q, q + kv),), "v": ((q + kv, q + 2 * kv),)}
    elif layout == "per_head":
        step = 3 * hd
        parts = {p: tuple((h * step + i * hd, h * step + (i + 1) * hd) for h in range(n_heads))
                 for i, p in enumerate("qkv")}
    else:  # per_group: (n_kv, n_heads / n_kv + 2, hd)
        per = n_heads // n_kv
        step = (per + 2) * hd
        parts = {"q": tuple((g * step, g * step + per * hd) for g in range(n_kv)),
                 "k": tuple((g * step + per * hd, g * step + (per + 1) * hd)
                            for g in range(n_kv)),
                 "v": tuple((g * step + (per + 1) * hd, (g + 1) * step) for g in range(n_kv))}
    total = sum(b - a for ranges in parts.values() for a, b in ranges)
    if total != rows:
        raise RankbiasError(f"a fused q/k/v projection of {rows} rows does not match the head "
                            f"layout ({n_heads} heads, {n_kv} key/value heads of {hd}): "
                            "check config.json")
    return parts


def uses_conv1d(entries: Sequence[Entry], config: Mapping) -> bool:
    """Whether GPT-2-style names are transformers' Conv1D (stored in x out)."""
    if config.get("model_type"):
        return config["model_type"] in CONV1D_MODEL_TYPES
    return any(_module(e.name) == "c_attn" and len(e.shape) == 2
               and e.shape[1] == 3 * e.shape[0] for e in entries)


# --- one matrix to analyze -------------------------------------------------------------------
@dataclass(frozen=True)
class Matrix:
    """A matrix to analyze: a stored tensor, or some rows of one (a fused projection)."""

    name: str
    entry: Entry
    role: str
    shape: tuple[int, int]  # (out, in), as reported
    transposed: bool = False  # stored in x out (Conv1D)
    rows: tuple[tuple[int, int], ...] | None = None  # row ranges of the (out, in) matrix

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix, from its stored tensor (a view where it can be)."""
        matrix = as_matrix(tensor)
        if self.transposed:
            matrix = matrix.T
        if self.rows:
            parts = [matrix[a:b] for a, b in self.rows]
            matrix = parts[0] if len(parts) == 1 else torch.cat(parts)
        return matrix

    @property
    def whole(self) -> bool:
        """The stored tensor as it is: its rows can be read in blocks."""
        return not self.transposed and self.rows is None


@dataclass
class AttentionLayer:
    """The q, k, v and o matrices of one attention layer and its head layout."""

    name: str
    parts: dict[str, Matrix]
    heads: tuple[int, int, int]


@dataclass
class Plan:
    matrices: list[Matrix] = field(default_factory=list)  # analyzed and averaged
    skipped: list[dict] = field(default_factory=list)  # {"name", "shape", "reason"}
    left_out: list[str] = field(default_factory=list)  # matrices out of the average
    attention: list[AttentionLayer] = field(default_factory=list)
    attention_notes: list[str] = field(default_factory=list)


def _passes(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> bool:
    def hit(patterns):
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)
    return (not include or hit(include)) and not hit(exclude)


def _candidates(entry: Entry, role: str, conv1d: bool, split: bool, config: Mapping,
                heads) -> list[Matrix]:
    """The matrices of one weight tensor: itself, or its q/k/v parts."""
    shape = tuple(entry.shape)
    transposed = conv1d and len(shape) == 2 and _module(entry.name) in _CONV1D_NAMES
    out, inp = (shape[1], shape[0]) if transposed else (shape[0], int(torch.Size(shape[1:])
                                                                      .numel()))
    tensor = entry.name.rsplit(".", 1)[-1]
    legacy = tensor == "in_proj_weight" and out == 3 * inp
    if role != "attention_qkv" or not (split or legacy):
        return [Matrix(entry.name, entry, role, (out, inp), transposed)]
    layout = fused_layout(_module(entry.name), tensor, config)
    sep = ":" if legacy else "."
    return [Matrix(f"{entry.name}{sep}{p}", entry, f"attention_{p}",
                   (sum(b - a for a, b in ranges), inp), transposed, ranges)
            for p, ranges in fused_rows(out, layout, heads).items()]


def _skip_reason(entry: Entry, known: Mapping[str, str] | None) -> str | None:
    if not entry.floating:
        return f"not floating point ({entry.dtype})"
    if len(entry.shape) == 0:
        return "0-D: a scalar"
    if len(entry.shape) == 1:
        return "1-D: a bias, norm or scale vector"
    if known is not None and entry.name not in known:
        return "not the weight of a Linear, Conv or attention layer"
    if not entry.name.endswith("weight"):
        return "not a layer's weight (its name does not end in 'weight')"
    return None


def plan(entries: Sequence[Entry], config: Mapping | None = None, include_all: bool = False,
         include: Sequence[str] = (), exclude: Sequence[str] = (), split_qkv: bool = False,
         attention_products: bool = False, known: Mapping[str, str] | None = None,
         layer_heads: Mapping[str, tuple[int, int, int]] | None = None,
         ordered: bool = True) -> Plan:
    """What to analyze of `entries` (in their order) and why the rest is not.

    `known`: {tensor name: role} when the model's modules are known (a rankbias checkpoint,
    a full saved model): only those are matrices. `layer_heads`: the head layout of
    attention layers known from their modules, by layer name. `ordered`: whether `entries`
    are in the model's order (a torch.save file) or sorted by name (safetensors): the rows of
    the latter are put in model order by layer and role (`model_order`).
    """
    config = dict(config or {})
    heads = config_heads(config)
    result = Plan()
    roles: dict[str, str] = {}
    for entry in entries:
        reason = _skip_reason(entry, known)
        if reason:
            result.skipped.append({"name": entry.name, "shape": list(entry.shape),
                                   "reason": reason})
        else:
            roles[entry.name] = (known or {}).get(entry.name) or role_of(
                entry.name, len(entry.shape), entry.shape)
    named_head = any(r in ("lm_head", "classifier") for r in roles.values())
    transformer = any(r.startswith("attention") for r in roles.values())
    if known is None and not named_head and (ordered or not transformer):
        _classifier_by_position(entries, roles, transformer)
    conv1d = uses_conv1d(entries, config)
    averaged, left_out, attention = [], [], []
    for entry in entries:
        if entry.name not in roles:
            continue
        for matrix in _candidates(entry, roles[entry.name], conv1d, split_qkv, config, heads):
            if not _passes([matrix.name, entry.name], include, exclude):
                result.skipped.append({"name": matrix.name, "shape": list(matrix.shape),
                                       "reason": FILTERED})
            elif matrix.role in LEFT_OUT and not include_all:
                left_out.append(matrix)
            else:
                averaged.append(matrix)
        if attention_products and roles[entry.name].startswith("attention") and _passes(
                [entry.name], include, exclude):
            attention.extend(_candidates(entry, roles[entry.name], conv1d, True, config, heads))
    if not averaged:  # nothing hidden: measure what there is rather than nothing
        averaged, left_out = left_out, []
    if not ordered:
        averaged, left_out = model_order(averaged), model_order(left_out)
    for matrix in left_out:
        result.skipped.append({"name": matrix.name, "shape": list(matrix.shape),
                               "reason": f"{LEFT_OUT[matrix.role]}: left out of the "
                                         "average (--all includes it)"})
    result.matrices, result.left_out = averaged, [m.name for m in left_out]
    if not averaged:
        raise RankbiasError(f"no weight matrix to analyze: {skipped_summary(result.skipped)}")
    if attention_products:
        _attention_layers(attention, heads, layer_heads or {}, result)
    return result


def _classifier_by_position(entries: Sequence[Entry], roles: dict[str, str],
                            transformer: bool) -> None:
    """The paper's rule for a checkpoint that names no head: its last 2-D weight (attention
    projections aside) is the classifier, if it is a plain linear layer (in a transformer:
    not an MLP's, not an embedding). In a transformer, only where the file keeps the model's
    order (not safetensors, whose keys are sorted as text)."""
    family = ("linear",) if transformer else ("linear", "mlp_in", "mlp_gate", "mlp_out")
    last = [e.name for e in entries if e.name in roles and len(e.shape) == 2
            and not roles[e.name].startswith("attention")]
    if last and roles[last[-1]] in family:
        roles[last[-1]] = "classifier"


def skipped_summary(skipped: Sequence[Mapping]) -> str:
    """'3 tensors skipped: 2 1-D: a bias ..., 1 filtered out ...' (counts by reason)."""
    counts: dict[str, int] = {}
    for row in skipped:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    if not counts:
        return "no tensor skipped"
    return (f"{len(skipped)} tensor{'s' if len(skipped) != 1 else ''} skipped: "
            + "; ".join(f"{n} {reason}" for reason, n in counts.items()))


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # the name up to its first layer index: model.layers.3
_ROLE_ORDER = ["embedding", "conv", "attention_qkv", "attention_q", "attention_k", "attention_v",
               "attention_o", "mlp_gate", "mlp_in", "mlp_out", "linear", "shortcut", "lm_head",
               "classifier"]


def model_order(matrices: Sequence[Matrix]) -> list[Matrix]:
    """Matrices of a name-sorted file in the order of a forward pass: embeddings and input
    convolutions, then layer by layer (by index) attention q, k, v, o and the MLP, then
    the rest and the head."""
    def key(m: Matrix):
        layer = _LAYER.match(m.name)
        group = 1 if layer else 0 if m.role in ("embedding", "conv") else 2
        return (group, natural_key(layer.group(1)) if layer else [],
                _ROLE_ORDER.index(m.role), natural_key(m.name))
    return sorted(matrices, key=key)


def _attention_layers(matrices: Sequence[Matrix], heads, layer_heads: Mapping,
                      result: Plan) -> None:
    groups: dict[str, list[Matrix]] = {}
    for matrix in matrices:
        found = _LAYER.match(matrix.name)
        groups.setdefault(found.group(1) if found else "", []).append(matrix)
    for layer, members in groups.items():
        by_part: dict[str, list[Matrix]] = {}
        for m in members:
            by_part.setdefault(m.role.removeprefix("attention_"), []).append(m)
        missing = [p for p in "qkvo" if len(by_part.get(p, ())) != 1]
        if missing:
            result.attention_notes.append(
                f"{layer or 'the model'}: no attention products (not exactly one "
                f"{'/'.join(missing)} projection)")
            continue
        parts = {p: by_part[p][0] for p in "qkvo"}
        names = [m.name.split(".") for m in parts.values()]
        common = itertools.takewhile(lambda words: len(set(words)) == 1, zip(*names))
        name = ".".join(w[0] for w in common) or layer
        layout = layer_heads.get(name) or heads
        if layout is None:
            raise RankbiasError("--attention-products needs the number of heads: put the "
                                "model's config.json beside the checkpoint")
        result.attention.append(AttentionLayer(name, parts, layout))
