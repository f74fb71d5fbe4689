"""Model-zoo pieces: a transformers architecture built from its config with sizes shrunk, and inputs for
it (used by `fxcc zoo` and the CI subset test).

Shrinking is by attribute name, the same rules for a model's config and for its text/vision/audio
sub-configs, so sizes that must agree across them (a projector between vision and text) agree.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 32, 2, 16, 64, 128
IMAGE, PATCH, EXPERTS = 64, 8, 4
# random token ids stay below the special tokens, which are moved to the top of the shrunk vocabulary
TOKENS = (3, 96)
# shrink levels, tried in order until the model builds and eager runs: (layers, shrink widths too, kv heads)
LEVELS = ((2, True, 1), (2, True, 2), (8, True, 2), (8, False, 0))

_LAYER_NAMES = re.compile(r"(^|_)(num_hidden_layers|n_layers?|num_layers|\w*_layers|depth|num_blocks)$")
_HIDDEN_NAMES = re.compile(r"(^|_)(hidden_size|d_model|n_embd|embed_dim|embedding_size|dim|hidden_dim|"
                           r"projection_dim|word_embed_proj_dim|out_hidden_size|d_embed|bottleneck_size)$")
_FFN_NAMES = re.compile(r"(intermediate_size|^ffn_dim|_ffn_dim|^d_ff|^n_inner|^mlp_dim|^d_inner)$")
_HEAD_NAMES = re.compile(r"(attention_heads|^n_heads?|^num_heads|_num_heads|_n_heads)$")
_EXPERT_NAMES = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$")
_TOPK_NAMES = re.compile(r"^(num_experts_per_tok|moe_topk|moe_k|num_selected_experts|top_k|experts_per_token)$")
_CHANNEL_LISTS = re.compile(r"(hidden_sizes|embed_dims?|dims|channels|conv_dim|hidden_dims|neck_hidden_sizes|"
                            r"embedding_sizes|widths)$")
_DEPTH_LISTS = re.compile(r"(depths|num_layers|layers|num_blocks|blocks_per_stage)$")
_HEAD_LISTS = re.compile(r"(num_heads|attention_heads|heads)$")
_TOKEN_IDS = re.compile(r"(token_id|token_index|token_ids)$")
_WIDTHS = {
    "head_dim": HEAD_DIM, "v_head_dim": HEAD_DIM,
    "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM, "kv_lora_rank": 16, "q_lora_rank": 16,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN, "rotary_dim": HEAD_DIM // 2,
}
_ALWAYS = {
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "num_mel_bins": 16, "max_source_positions": 16,
    "max_target_positions": 64, "window_size": 2, "num_query_tokens": 4, "image_seq_length": 4,
}


@dataclass(frozen=True)
class Shrink:
    """How far to shrink: the most layers per stack, and whether widths (hidden, heads, ffn) shrink too."""

    layers: int = 2
    widths: bool = True
    kv_heads: int = 1  # grouped-query attention: key/value heads (0: leave them)

    def int_value(self, name: str, v: int) -> int | None:
        """The shrunk value of integer setting `name` (None: leave it)."""
        if name.startswith("vocab_size"):
            return VOCAB
        if "vocab" in name:  # hash or byte-group vocabularies, type vocabularies
            return min(v, VOCAB)
        if name in _ALWAYS:
            return min(v, _ALWAYS[name])
        if _LAYER_NAMES.search(name):
            return min(v, self.layers)
        if _EXPERT_NAMES.match(name):
            return min(v, EXPERTS)
        if _TOPK_NAMES.match(name):
            return min(v, 2)
        if name == "image_size" or name.endswith("_image_size"):
            return min(v, IMAGE)
        if name == "patch_size":
            return min(v, PATCH)
        if name in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
            return min(v, 512)
        if not self.widths:
            return None
        if name in ("num_key_value_heads", "num_kv_heads") and self.kv_heads:
            return min(v, self.kv_heads)
        if name in _WIDTHS:
            return min(v, _WIDTHS[name])
        if _HIDDEN_NAMES.search(name) or "hidden_size" in name:
            return min(v, HIDDEN)
        if _FFN_NAMES.search(name):
            return min(v, FFN)
        if _HEAD_NAMES.search(name):
            return min(v, HEADS)
        if "head_dim" in name:
            return min(v, HEAD_DIM)
        if name.endswith("d_head"):  # state-space heads: n_heads * d_head = expand * hidden
            return min(v, HIDDEN)
        return None

    def list_value(self, name: str, v: list) -> list | None:
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return None
        if name in ("image_size", "patch_size"):
            return [min(x, IMAGE if name == "image_size" else PATCH) for x in v]
        if _DEPTH_LISTS.search(name):
            return [min(x, 1) for x in v]
        if not self.widths:
            return None
        if _HEAD_LISTS.search(name):
            return [min(x, HEADS) for x in v]
        if _CHANNEL_LISTS.search(name) and max(v) > 64:
            scale = 64 / max(v)
            return [max(8, int(round(x * scale / 8)) * 8) for x in v]
        return None


def _config_base():
    from transformers import PreTrainedConfig
    return PreTrainedConfig


def _init_names(cls: type) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")}


def shrunk_settings(config: Any, shrink: Shrink, cut: bool = False) -> dict[str, Any]:
    """The constructor settings of `config` with sizes shrunk; sub-configs as dicts of theirs, per-layer
    lists and per-layer dicts that no longer fit dropped or cut, so that the config derives them again
    (`cut`: per-layer lists keep their first entries instead, for configs that derive them from a fixed default)."""
    base = _config_base()
    full = config.to_dict()
    names = _init_names(type(config))
    out: dict[str, Any] = {}
    for name in names:
        v = vars(config).get(name)
        if isinstance(v, base):
            out[name] = {"model_type": v.model_type, **shrunk_settings(v, shrink, cut)}
            continue
        if name in full:
            v = full[name]
        elif name not in vars(config):
            v = _get(config, name)  # an alias (attribute_map) of a stored setting
            if v is None:
                continue
        if v is None:
            if _TOPK_NAMES.match(name) and any(_EXPERT_NAMES.match(k) and full.get(k) for k in full):
                out[name] = 2  # experts without a default top-k (the model would route to None)
            continue  # derived by the config (passing None would override the derivation)
        if isinstance(v, bool):
            out[name] = v
        elif isinstance(v, int):
            new = shrink.int_value(name, v)
            out[name] = v if new is None else new
        elif isinstance(v, (list, tuple)):
            new = shrink.list_value(name, list(v))
            out[name] = v if new is None else type(v)(new)
        else:
            out[name] = v
    changed = [k for k in out if isinstance(out[k], int) and not isinstance(out[k], bool)
               and _LAYER_NAMES.search(k) and full.get(k) != out[k]]
    old = {full.get(k) for k in changed}
    new_layers = min((out[k] for k in changed), default=None)
    for k, v in list(out.items()):
        if isinstance(v, list) and old and len(v) in old and not _DEPTH_LISTS.search(k):
            if cut and new_layers is not None:
                out[k] = v[:new_layers]
            else:
                del out[k]  # e.g. layer_types: derived again from the new layer count
        elif isinstance(v, dict) and new_layers is not None and v and all(str(x).isdigit() for x in v):
            out[k] = {x: y for x, y in v.items() if int(x) < new_layers}  # per-layer overrides
        elif isinstance(v, dict) and "mrope_section" in v:
            out[k] = dict(v, mrope_section=_sections(v["mrope_section"], _rope_dim(out) // 2))
    h, e, d = (out.get(k) for k in ("hidden_size", "expand", "head_dim"))
    if all(isinstance(x, int) and not isinstance(x, bool) for x in (h, e, d)) and "num_heads" in out and d:
        out["num_heads"] = max(1, h * e // d)  # state-space heads: num_heads * head_dim = expand * hidden
        if isinstance(out.get("n_groups"), int) and out["num_heads"] % out["n_groups"]:
            out["n_groups"] = 1
    for k in ("out_features", "out_indices", "_out_features", "_out_indices", "stage_names"):
        if k in out and old:
            del out[k]  # backbone stages named by the old depth
    return out


def _rope_dim(settings: dict) -> int:
    for k in ("qk_rope_head_dim", "head_dim"):
        if isinstance(settings.get(k), int):
            return settings[k]
    h, n = settings.get("hidden_size"), settings.get("num_attention_heads")
    return h // n if isinstance(h, int) and isinstance(n, int) and n else HEAD_DIM


def _sections(sec: list[int], total: int) -> list[int]:
    """Multimodal rotary sections scaled to sum to `total` (each at least 1)."""
    scaled = [max(1, x * total // sum(sec)) for x in sec]
    scaled[0] += total - sum(scaled)
    return scaled


def _token_ids(config: Any, vocab: int) -> dict[str, Any]:
    """Special-token ids that would fall outside the shrunk vocabulary, moved to its top, distinct."""
    out, used = {}, {}
    for name, v in vars(config).items():
        if not _TOKEN_IDS.search(name) or isinstance(v, bool):
            continue
        ids = v if isinstance(v, list) else [v]
        if not ids or not all(isinstance(i, int) for i in ids) or all(0 <= i < vocab for i in ids):
            continue
        moved = [i if 0 <= i < vocab else used.setdefault(i, vocab - 1 - len(used)) for i in ids]
        out[name] = moved if isinstance(v, list) else moved[0]
    return out


def shrunk_config(model_type: str, shrink: Shrink = Shrink()) -> Any:
    """The default config of `model_type`, rebuilt with sizes shrunk (and its sub-configs too)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    try:
        config = type(default)(**shrunk_settings(default, shrink))
    except Exception as derived:  # noqa: BLE001 (a validator: per-layer lists derived from a fixed default)
        try:
            config = type(default)(**shrunk_settings(default, shrink, cut=True))
        except Exception:  # noqa: BLE001 (the first failure is the one to report)
            raise derived from None
    for cfg in _all_configs(config):
        vocab = vars(cfg).get("vocab_size")
        for k, v in _token_ids(cfg, vocab if isinstance(vocab, int) else _vocab(config)).items():
            setattr(cfg, k, v)
    return config


def _all_configs(config: Any) -> list[Any]:
    base = _config_base()
    out = [config]
    for v in vars(config).values():
        if isinstance(v, base):
            out += _all_configs(v)
    return out


def build(model_type: str, shrink: Shrink = Shrink(), seed: int = 0, max_params: int | None = None) -> nn.Module:
    """The AutoModel of `model_type` from its shrunk config, fp32, in eval mode. With `max_params`, the model
    is first built on the meta device (no memory) and a larger one raises ValueError naming its largest
    parameter."""
    from transformers import AutoModel

    config = shrunk_config(model_type, shrink)
    if max_params is not None:
        try:
            with torch.device("meta"):
                meta = AutoModel.from_config(config, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - a model that cannot be made on meta is measured when built
            meta = None
        n = sum(p.numel() for p in meta.parameters()) if meta is not None else 0
        if n > max_params:
            name, p = max(meta.named_parameters(), key=lambda kv: kv[1].numel())
            raise ValueError(f"{n / 1e6:.0f}M parameters after shrinking (largest: {name} {list(p.shape)})")
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    return model.eval()


# ------------------------------------------------------------------------------------------------ inputs

# two input shapes per model: (batch, text length, decoder length); images and audio vary the batch
SHAPES = ((2, 8, 5), (1, 13, 7))
SAMPLES = 1600  # raw audio samples per row


def _sub(config: Any, *names: str) -> Any:
    for n in names:
        sub = vars(config).get(n)
        if isinstance(sub, _config_base()):
            return sub
    return config


def _get(config: Any, name: str, default: Any = None) -> Any:
    try:
        v = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse global reads
        v = None
    return default if v is None else v


def _vocab(config: Any) -> int:
    for cfg in _all_configs(config):
        v = vars(cfg).get("vocab_size")
        if isinstance(v, int) and v > 0:
            return v
    return VOCAB


def _ids(gen: torch.Generator, b: int, t: int, vocab: int) -> torch.Tensor:
    lo, hi = (TOKENS[0], min(TOKENS[1], vocab)) if vocab > TOKENS[0] + 1 else (0, vocab)
    return torch.randint(lo, hi, (b, t), generator=gen)


def _mask(b: int, t: int) -> torch.Tensor:
    """All ones, except the last row's final quarter when the batch has several rows (padding)."""
    m = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        m[-1, t - max(1, t // 4):] = 0
    return m


def _image(gen: torch.Generator, config: Any, b: int, frames: int = 0) -> torch.Tensor:
    vc = _sub(config, "vision_config", "backbone_config", "encoder_config")
    size = _get(vc, "image_size") or _get(config, "image_size") or IMAGE
    size = size if isinstance(size, (list, tuple)) else (size, size)
    ch = _get(vc, "num_channels") or _get(config, "num_channels") or 3
    return torch.randn(b, *([frames] if frames else []), ch, *size[-2:], generator=gen)


def _features(gen: torch.Generator, config: Any, b: int, mel_first: bool) -> torch.Tensor:
    """Audio features: (batch, mel bins, frames) or (batch, frames, features)."""
    ac = _sub(config, "audio_config", "encoder_config")
    mel = _get(ac, "num_mel_bins") or _get(config, "num_mel_bins")
    feat = (_get(ac, "feature_size") or _get(ac, "input_feat_per_channel") or _get(ac, "input_dim") or mel or 16)
    frames = 2 * (_get(ac, "max_source_positions") or 16)
    if mel_first:
        return torch.randn(b, mel or feat, frames, generator=gen)
    return torch.randn(b, frames, feat * (_get(ac, "input_channels", 1)), generator=gen)


def _boxes(gen: torch.Generator, b: int, t: int) -> torch.Tensor:
    xy = torch.randint(0, 500, (b, t, 2), generator=gen)
    return torch.cat([xy, xy + torch.randint(0, 500, (b, t, 2), generator=gen)], -1)


# forward argument -> the ways to make it, most likely first: variant -> (generator, config, b, t, td) -> tensor
MAKERS: dict[str, dict[str, Any]] = {
    "input_ids": {"ids": lambda g, c, b, t, td: _ids(g, b, t, _vocab(c))},
    "decoder_input_ids": {"ids": lambda g, c, b, t, td: _ids(g, b, td, _vocab(c))},
    "attention_mask": {"padded": lambda g, c, b, t, td: _mask(b, t)},
    "pixel_values": {"image": lambda g, c, b, t, td: _image(g, c, b),
                     "video": lambda g, c, b, t, td: _image(g, c, b, _get(c, "num_frames", 2)),
                     "pair": lambda g, c, b, t, td: _image(g, c, b, 2)},
    "input_features": {"mel-first": lambda g, c, b, t, td: _features(g, c, b, True),
                       "frames-first": lambda g, c, b, t, td: _features(g, c, b, False)},
    "input_values": {"wave": lambda g, c, b, t, td: torch.randn(b, SAMPLES, generator=g),
                     "wave-1ch": lambda g, c, b, t, td: torch.randn(b, 1, SAMPLES, generator=g)},
    "bbox": {"boxes": lambda g, c, b, t, td: _boxes(g, b, t)},
}


@dataclass(frozen=True)
class Recipe:
    """Which forward arguments a call passes and how each is made: ((argument, variant), ...)."""

    parts: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return ", ".join(f"{a}:{v}" for a, v in self.parts)

    def make(self, model: nn.Module, shape: int, seed: int = 0) -> dict[str, Any]:
        """The keyword arguments for input shape `shape` (an index into SHAPES)."""
        b, t, td = SHAPES[shape]
        gen = torch.Generator().manual_seed(seed + 17 * shape)
        return {a: MAKERS[a][v](gen, model.config, b, t, td) for a, v in self.parts}


def recipes(model: nn.Module) -> list[Recipe] | str:
    """Input recipes for `model.forward`, most likely first; or the name of a required argument that no
    recipe can make. Built from the model's `main_input_name`, its forward signature and its config: a
    model with text and vision sub-configs also gets pixel values, an encoder-decoder decoder inputs."""
    params = inspect.signature(model.forward).parameters
    required = [n for n, p in params.items()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    main = getattr(model, "main_input_name", "input_ids")
    for name in [*required, main]:
        if name not in MAKERS:
            return name
    config = model.config
    core = list(dict.fromkeys([main, *required]))
    optional = []
    if "decoder_input_ids" in params and config.is_encoder_decoder:
        core.append("decoder_input_ids")
    if "bbox" in params:
        core.append("bbox")
    for name, sub in (("input_ids", "text_config"), ("pixel_values", "vision_config")):
        if name in params and name not in core and (hasattr(config, sub) or name == "input_ids"):
            optional.append(name)
    core = list(dict.fromkeys(core))
    out: list[Recipe] = []

    def add(names: list[str], pick: dict[str, str]) -> None:
        parts = [(n, pick.get(n, next(iter(MAKERS[n])))) for n in names]
        if "input_ids" in names and "attention_mask" in params and pick.get("attention_mask") != "":
            parts.append(("attention_mask", "padded"))
        r = Recipe(tuple(parts))
        if r not in out:
            out.append(r)

    for extra in (optional, []):
        for n in [*core, *extra]:
            for variant in MAKERS[n]:
                add([*core, *extra], {n: variant})
    add(core, {"attention_mask": ""})
    return out
