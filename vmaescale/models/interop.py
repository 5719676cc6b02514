"""Checkpoint interop: official VideoMAE / V2 state dicts and Hugging Face `transformers` dirs.

    import:  official .pth | HF dir (config.json + weights)  ->  vmaescale checkpoint dir
    export:  vmaescale checkpoint dir (or model)              ->  HF dir for
             VideoMAEForPreTraining / VideoMAEForVideoClassification.from_pretrained

What the weights do not say is explicit: official checkpoints carry no head counts
(standard table per width, `--num-heads` / `--decoder-heads` to override) and no clip
shape (`--num-frames` 16, `--image-size` 224 unless given). HF dirs take both from
config.json. Every weight is accounted for: a missing or unexpected key is an error that
lists the keys. Writing needs no `transformers` (plain json + safetensors).

Norm eps: official models use 1e-6 everywhere. HF uses config.layer_norm_eps in the blocks
and its encoder norm, but a plain nn.LayerNorm (eps 1e-5) for fc_norm and decoder.norm;
imports set ModelSize.norm_eps / head_norm_eps to match, exports cannot express any other
head eps (see `hf_config`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vmaescale.masking import token_grid
from vmaescale.models.checkpoint import (FORMAT, META_FILE, VERSION, build_model, load_model_dir,
                                         load_state_dict_strict, model_meta, unwrap)
from vmaescale.models.sizes import SIZES, ModelSize

OFFICIAL_NORM_EPS = 1e-6
HF_HEAD_NORM_EPS = 1e-5  # nn.LayerNorm default: HF fc_norm and decoder.norm take no eps from the config
DEFAULT_NUM_FRAMES = 16
DEFAULT_IMAGE_SIZE = 224

# Heads are not in the weights: the standard count per width (SPEC section 1, v1 H decoder 640/10).
ENCODER_HEADS = {s.embed_dim: s.num_heads for s in SIZES.values()}
DECODER_HEADS = {s.decoder_dim: s.decoder_heads for s in SIZES.values()} | {640: 10}

STATE_DICT_CONTAINERS = ("model", "module", "state_dict")
ENCODER_PREFIXES = ("encoder.", "backbone.")  # official pretrain / other finetune wrappers

# Hugging Face names. Block-relative: ours -> HF (qkv splits into three row blocks).
_BLOCK_MODULES = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                  "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                  "mlp.fc2": "output.dense"}
BLOCK_TO_HF = {f"{ours}.{p}": (f"{hf}.{p}",)
               for ours, hf in _BLOCK_MODULES.items() for p in ("weight", "bias")}
BLOCK_TO_HF |= {"attn.q_bias": ("attention.attention.q_bias",),
                "attn.v_bias": ("attention.attention.v_bias",),
                "attn.qkv.weight": tuple(f"attention.attention.{n}.weight"
                                         for n in ("query", "key", "value"))}
# In-memory names transformers v5 uses for the q / v biases (its files store q_bias / v_bias).
HF_BIAS_ALIASES = {"attention.attention.query.bias": "attention.attention.q_bias",
                   "attention.attention.value.bias": "attention.attention.v_bias"}
HF_KEY_BIAS = "attention.attention.key.bias"

# Model-level prefixes (ours, HF); a prefix ending in "blocks." holds numbered blocks.
HF_PREFIXES = {
    "pretrain": (("encoder.patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
                 ("encoder.blocks.", "videomae.encoder.layer."),
                 ("encoder.norm.", "videomae.layernorm."),
                 ("encoder_to_decoder.", "encoder_to_decoder."),
                 ("mask_token", "mask_token"),
                 ("decoder.blocks.", "decoder.decoder_layers."),
                 ("decoder.norm.", "decoder.norm."),
                 ("decoder.head.", "decoder.head.")),
    "classification": (("patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
                       ("blocks.", "videomae.encoder.layer."),
                       ("fc_norm.", "fc_norm."),
                       ("head.", "classifier.")),
}
# A bare VideoMAEModel: the classifier's encoder plus the final norm of use_mean_pooling=False.
HF_PREFIXES["encoder"] = HF_PREFIXES["classification"][:2] + (("norm.", "videomae.layernorm."),)
HF_ARCHITECTURES = {"pretrain": "VideoMAEForPreTraining", "classification": "VideoMAEForVideoClassification"}

# VideoMAEConfig defaults (transformers 5.x), for config.json files that omit default values.
HF_CONFIG_DEFAULTS = dict(
    image_size=224, patch_size=16, num_channels=3, num_frames=16, tubelet_size=2, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, qv_bias=True, use_mean_pooling=True, decoder_num_attention_heads=6,
    decoder_hidden_size=384, decoder_num_hidden_layers=4, decoder_intermediate_size=1536,
    norm_pix_loss=True)


@dataclass
class SourceWeights:
    """A state dict in our key names, its task, and how it was read.

    task: "pretrain", "classification", or "encoder" (no decoder and no head).
    """

    task: str
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    model: nn.Module
    notes: list[str]

    def summary(self) -> str:
        return "\n".join(self.notes)


# ---------------------------------------------------------------- official checkpoints


def torch_load_checkpoint(path: str | Path, allow_pickle: bool = False):
    """torch.load with weights_only=True; argparse.Namespace (official "args") is allowed.

    Anything else that needs full unpickling (arbitrary code) is refused unless
    `allow_pickle`, which is only for files from a source you trust.
    """
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects that a weights-only load refuses ({refused_global(err)}); "
                         "if you trust the file, pass --allow-pickle (allow_pickle=True)") from err


def refused_global(err: Exception) -> str:
    """The class a weights-only load refused, from torch's message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"unsupported global {found.group(1)}" if found else str(err).strip().splitlines()[0]


def pick_state_dict(checkpoint, origin: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(where, state dict): under "model" / "module" / "state_dict", or the top level."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{origin} holds a {type(checkpoint).__name__}; "
                         "accepted: a dict (a state dict or a checkpoint holding one)")
    where, state = "top level", checkpoint
    for name in STATE_DICT_CONTAINERS:
        if isinstance(checkpoint.get(name), dict):
            where, state = f"under {name!r}", checkpoint[name]
            break
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{origin}: the state dict {where} has non-tensor entries {not_tensors[:10]}; "
                         f"accepted: tensors under one of {list(STATE_DICT_CONTAINERS)} or at the top level")
    return where, state


def strip_wrapper_prefixes(state_dict: dict) -> tuple[dict, list[str]]:
    """Drop torch.compile `_orig_mod.` (anywhere) and DDP `module.` (leading) from every key."""
    found, out = set(), {}
    for key, value in state_dict.items():
        if "_orig_mod." in key:
            found.add("_orig_mod.")
            key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            found.add("module.")
            key = key[len("module."):]
        out[key] = value
    return out, sorted(found)


def detect_task(state_dict: dict) -> str:
    if "mask_token" in state_dict or "encoder_to_decoder.weight" in state_dict \
            or any(k.startswith("decoder.") for k in state_dict):
        return "pretrain"
    if "head.weight" in state_dict:
        return "classification"
    return "encoder"


def bare_encoder_key(key: str) -> str | None:
    """`encoder.blocks.0...` / `backbone.blocks.0...` -> `blocks.0...`; None for other keys."""
    for prefix in ENCODER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def to_our_names(state_dict: dict, task: str) -> dict:
    """Encoder keys under `encoder.` for pretraining, bare for classifiers and encoders."""
    encoder_prefix = "encoder." if task == "pretrain" else ""
    out = {}
    for key, value in state_dict.items():
        bare = bare_encoder_key(key)
        out[key if bare is None else encoder_prefix + bare] = value
    return out


def load_official_state_dict(path: str | Path, allow_pickle: bool = False) -> SourceWeights:
    """An official (v1 / V2) checkpoint file as a state dict in our names, with its task."""
    where, state = pick_state_dict(torch_load_checkpoint(path, allow_pickle), str(path))
    state, stripped = strip_wrapper_prefixes(state)
    task = detect_task(state)
    notes = [f"official checkpoint {path}: state dict {where}, {len(state)} tensors"
             + (f", stripped prefixes {stripped}" if stripped else ""),
             f"task: {task}"]
    return SourceWeights(task, to_our_names(state, task), notes)


def tensor_shape(state_dict: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"cannot detect {what}: the state dict has no {key!r}")
    return tuple(state_dict[key].shape)


def count_blocks(state_dict: dict, prefix: str) -> int:
    """1 + the highest block index under `prefix` (gaps surface later as missing keys)."""
    indices = [int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)]
    return max(indices) + 1 if indices else 0


def standard_heads(dim: int, table: dict[int, int], flag: str, given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, f"{flag} {given}"
    if dim not in table:
        raise ValueError(f"no standard head count for width {dim} (known: {dict(sorted(table.items()))}); "
                         f"pass {flag}")
    return table[dim], f"standard for width {dim}; override with {flag}"


def detect_official_size(state_dict: dict, task: str, num_heads: int | None = None,
                         decoder_heads: int | None = None) -> tuple[ModelSize, int, list[str]]:
    """(size, decoder_depth, notes) from tensor shapes; heads from the table unless given.

    Classifier and encoder checkpoints have no decoder: their decoder widths are 0.
    """
    enc = "encoder." if task == "pretrain" else ""
    dim, _, tubelet, patch, _ = tensor_shape(state_dict, f"{enc}patch_embed.proj.weight", "the patch size")
    depth = count_blocks(state_dict, f"{enc}blocks.")
    mlp = tensor_shape(state_dict, f"{enc}blocks.0.mlp.fc1.weight", "the mlp width")[0]
    heads, heads_how = standard_heads(dim, ENCODER_HEADS, "--num-heads", num_heads)
    notes = [f"encoder: patch {patch}, tubelet {tubelet}, dim {dim}, depth {depth}, mlp {mlp}, "
             f"heads {heads} ({heads_how})"]
    dec_dim = dec_depth = dec_heads = dec_mlp = 0
    if task == "pretrain":
        dec_dim = tensor_shape(state_dict, "encoder_to_decoder.weight", "the decoder width")[0]
        dec_depth = count_blocks(state_dict, "decoder.blocks.")
        dec_mlp = tensor_shape(state_dict, "decoder.blocks.0.mlp.fc1.weight", "the decoder mlp width")[0]
        dec_heads, how = standard_heads(dec_dim, DECODER_HEADS, "--decoder-heads", decoder_heads)
        notes.append(f"decoder: dim {dec_dim}, depth {dec_depth}, mlp {dec_mlp}, heads {dec_heads} ({how})")
    size = ModelSize(patch, dim, depth, heads, mlp, dec_dim, dec_heads, dec_mlp, tubelet,
                     norm_eps=OFFICIAL_NORM_EPS, head_norm_eps=OFFICIAL_NORM_EPS)
    notes.append(f"norm eps {OFFICIAL_NORM_EPS} everywhere (official)")
    return size, dec_depth, notes


def clip_shape(size: ModelSize, num_frames: int | None, image_size: int | None,
               source_frames: int, source_image: int, source: str) -> tuple[int, int, str]:
    """(num_frames, image_size, note): the flag where given, else the source's value."""
    frames, frames_how = (num_frames, "--num-frames") if num_frames is not None else (source_frames, source)
    image, image_how = (image_size, "--image-size") if image_size is not None else (source_image, source)
    grid = token_grid(frames, image, size.patch_size, size.tubelet_size)
    note = (f"clip: {frames} frames ({frames_how}), {image} px ({image_how}) -> "
            f"{grid.t}x{grid.h}x{grid.w} = {grid.num_tokens} tokens")
    return frames, image, note


def load_weights(model: nn.Module, weights: SourceWeights, origin: str) -> None:
    """Load `weights` into `model` strictly.

    An encoder-only source goes into a classifier whose fc_norm and head keep their
    finetune init; its final encoder norm (`norm.*`, unused by the mean-pooling classifier,
    as in official finetuning) is left out. Both are reported in `weights.notes`.
    """
    if weights.task != "encoder":
        load_state_dict_strict(model, weights.state_dict, origin)
        return
    dropped = sorted(k for k in weights.state_dict if k.startswith("norm."))
    encoder = {k: v for k, v in weights.state_dict.items() if k not in dropped}
    wanted = {k for k in model.state_dict() if not k.startswith(("fc_norm.", "head."))}
    unexpected = sorted(set(encoder) - wanted)
    if unexpected:
        raise ValueError(f"{origin}: unexpected keys {unexpected} in an encoder-only state dict")
    model.load_pretrained_encoder(encoder)
    weights.notes.append(f"encoder-only source: fc_norm and head ({model.num_classes} classes) freshly "
                         "initialised" + (f"; dropped the final encoder norm {dropped}" if dropped else ""))


def imported_meta(task: str, size: ModelSize, frames: int, image: int, decoder_depth: int,
                   num_classes: int | None, num_classes_found: int | None) -> dict:
    """The vmaescale.json fields for an imported model; encoder-only sources need num_classes."""
    meta = {"format": FORMAT, "version": VERSION, "size": size.to_dict(), "num_frames": frames,
            "image_size": image}
    if task != "encoder" and num_classes is not None:
        raise ValueError(f"--num-classes {num_classes} applies to encoder-only sources; this one is a {task} "
                         "checkpoint")
    if task == "pretrain":
        return meta | {"task": "pretrain", "decoder_depth": decoder_depth}
    if task == "classification":
        return meta | {"task": "classification", "num_classes": num_classes_found}
    if num_classes is None:
        raise ValueError("the source has neither a decoder nor a classifier head; pass --num-classes N to "
                         "import its encoder into an N-class classifier")
    return meta | {"task": "classification", "num_classes": num_classes}


def import_official(path: str | Path, num_frames: int | None = None, image_size: int | None = None,
                    num_heads: int | None = None, decoder_heads: int | None = None,
                    num_classes: int | None = None, allow_pickle: bool = False) -> ImportResult:
    """An official VideoMAE / V2 .pth (pretrain, finetune, or encoder only) as our model."""
    weights = load_official_state_dict(path, allow_pickle)
    size, decoder_depth, notes = detect_official_size(weights.state_dict, weights.task, num_heads,
                                                      decoder_heads)
    weights.notes += notes
    frames, image, note = clip_shape(size, num_frames, image_size, DEFAULT_NUM_FRAMES, DEFAULT_IMAGE_SIZE,
                                     "default; not in the weights")
    weights.notes.append(note)
    found = None
    if weights.task == "classification":
        found = tensor_shape(weights.state_dict, "head.weight", "classes")[0]
        weights.notes.append(f"classes: {found} (head.weight)")
    meta = imported_meta(weights.task, size, frames, image, decoder_depth, num_classes, found)
    model = build_model(meta)
    load_weights(model, weights, str(path))
    return ImportResult(model, weights.notes)


# ---------------------------------------------------------------- Hugging Face names


def hf_names(key: str, task: str) -> tuple[str, ...]:
    """The HF on-disk name(s) of one of our keys (attn.qkv.weight -> query, key, value)."""
    for ours, hf in HF_PREFIXES[task]:
        if key.startswith(ours):
            rest = key[len(ours):]
            if not ours.endswith("blocks."):
                return (hf + rest,)
            index, name = rest.split(".", 1)
            return tuple(f"{hf}{index}.{n}" for n in BLOCK_TO_HF[name])
    raise KeyError(f"{key!r} has no Hugging Face name for a {task} model")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Our state dict in HF on-disk names; every tensor is contiguous and owns its storage."""
    out = {}
    for key, value in state_dict.items():
        names = hf_names(key, task)
        value = value.detach().cpu()
        if len(names) == 1:
            out[names[0]] = value.contiguous()
        else:
            out.update(zip(names, (part.clone() for part in value.chunk(len(names)))))  # qkv rows
    return out


def canonical_hf_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """query.bias / value.bias -> q_bias / v_bias; key.bias (must be zero) dropped."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith("." + HF_KEY_BIAS):
            if value.abs().max() > 0:
                raise ValueError(f"{key} is nonzero; VideoMAE attention has no key bias "
                                 "(accepted: absent or zero)")
            continue
        out[canonical_hf_name(key)] = value
    return out


def canonical_hf_name(key: str) -> str:
    for alias, name in HF_BIAS_ALIASES.items():
        if key.endswith("." + alias):
            return key[:-len(alias)] + name
    return key


def add_zero_qv_biases(hf_state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Zero q / v biases for a qv_bias=False model: the same function in our parametrisation."""
    for name in expected - set(hf_state):
        base, _, bias = name.rpartition(".")
        if bias in ("q_bias", "v_bias"):
            weight = hf_state[f"{base}.{'query' if bias == 'q_bias' else 'value'}.weight"]
            hf_state[name] = weight.new_zeros(weight.shape[0])


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], our_keys, task: str, origin: str,
                       qv_bias: bool = True) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict for `our_keys`; missing / unexpected HF keys are an error."""
    hf_state = canonical_hf_names(hf_state)
    name_map = {key: hf_names(key, task) for key in our_keys}
    expected = {n for names in name_map.values() for n in names}
    if not qv_bias:
        add_zero_qv_biases(hf_state, expected)
    missing, unexpected = sorted(expected - set(hf_state)), sorted(set(hf_state) - expected)
    if missing or unexpected:
        raise ValueError(f"{origin} does not match a {task} model: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    return {key: torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
            for key, names in name_map.items()}


# ---------------------------------------------------------------- Hugging Face import


def read_hf_config(path: Path) -> dict:
    """config.json over the VideoMAEConfig defaults, checked for what we can express."""
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "videomae":
        raise ValueError(f"{path}/config.json model_type {config.get('model_type')!r}; accepted: 'videomae'")
    if "qkv_bias" in config:
        config["qv_bias"] = config.pop("qkv_bias")
    config = HF_CONFIG_DEFAULTS | config
    for name, accepted in (("hidden_act", "gelu"), ("num_channels", 3)):
        if config[name] != accepted:
            raise ValueError(f"{path}/config.json {name} {config[name]!r}; accepted: {accepted!r}")
    return config


def square(value, name: str) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{name} {value!r}; accepted: an int or a square [n, n]")


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no weights; accepted: model.safetensors, "
                            "model.safetensors.index.json or pytorch_model.bin")


def hf_task(hf_state: dict) -> str:
    if "decoder.head.weight" in hf_state:
        return "pretrain"
    if "classifier.weight" in hf_state:
        return "classification"
    return "encoder"


def check_hf_pooling(config: dict, task: str, origin: str) -> None:
    """Pretraining needs the final encoder norm (use_mean_pooling=False); classifiers mean-pool."""
    if task == "pretrain" and config["use_mean_pooling"]:
        raise ValueError(f"{origin}: a pretraining model with use_mean_pooling=true has no final "
                         "encoder norm before encoder_to_decoder; vmaescale (and official VideoMAE) "
                         "always has one; accepted: use_mean_pooling=false")
    if task == "classification" and not config["use_mean_pooling"]:
        raise ValueError(f"{origin}: use_mean_pooling=false classifies the first token after a final norm; "
                         "accepted: use_mean_pooling=true (mean pool -> fc_norm -> classifier)")


def hf_model_size(config: dict, num_heads: int | None, decoder_heads: int | None) -> ModelSize:
    """The config's widths (heads overridable), eps as HF applies them."""
    heads = config["num_attention_heads"] if num_heads is None else num_heads
    dec_heads = config["decoder_num_attention_heads"] if decoder_heads is None else decoder_heads
    return ModelSize(
        patch_size=square(config["patch_size"], "patch_size"), embed_dim=config["hidden_size"],
        depth=config["num_hidden_layers"], num_heads=heads, mlp_hidden=config["intermediate_size"],
        decoder_dim=config["decoder_hidden_size"], decoder_heads=dec_heads,
        decoder_mlp_hidden=config["decoder_intermediate_size"], tubelet_size=config["tubelet_size"],
        norm_eps=config["layer_norm_eps"], head_norm_eps=HF_HEAD_NORM_EPS)


def hf_notes(path: Path, task: str, size: ModelSize, config: dict) -> list[str]:
    notes = [f"Hugging Face dir {path}", f"task: {task}",
             f"encoder: patch {size.patch_size}, tubelet {size.tubelet_size}, dim {size.embed_dim}, "
             f"depth {size.depth}, mlp {size.mlp_hidden}, heads {size.num_heads}"]
    if task == "pretrain":
        notes.append(f"decoder: dim {size.decoder_dim}, depth {config['decoder_num_hidden_layers']}, "
                     f"mlp {size.decoder_mlp_hidden}, heads {size.decoder_heads}")
        if not config["norm_pix_loss"]:
            notes.append("config norm_pix_loss=false: vmaescale always trains on normalized pixels")
    notes.append(f"norm eps {size.norm_eps} (layer_norm_eps), head norm eps {size.head_norm_eps} (HF fixed)")
    if not config["qv_bias"]:
        notes.append("qv_bias=false: q / v biases set to zero")
    return notes


def with_videomae_prefix(hf_state: dict) -> dict:
    """A bare VideoMAEModel save has no `videomae.` prefix; the task models do."""
    if any(k.startswith("videomae.") for k in hf_state):
        return hf_state
    return {f"videomae.{k}": v for k, v in hf_state.items()}


def import_hf(path: str | Path, num_frames: int | None = None, image_size: int | None = None,
              num_heads: int | None = None, decoder_heads: int | None = None,
              num_classes: int | None = None) -> ImportResult:
    """A transformers VideoMAEForPreTraining / ForVideoClassification / Model dir as our model."""
    path = Path(path)
    config = read_hf_config(path)
    hf_state = with_videomae_prefix(read_hf_weights(path))
    task = hf_task(hf_state)
    check_hf_pooling(config, task, str(path))
    size = hf_model_size(config, num_heads, decoder_heads)
    notes = hf_notes(path, task, size, config)
    frames, image, note = clip_shape(size, num_frames, image_size, config["num_frames"],
                                     square(config["image_size"], "image_size"), "config.json")
    notes.append(note)
    found = hf_state["classifier.weight"].shape[0] if task == "classification" else None
    meta = imported_meta(task, size, frames, image, config["decoder_num_hidden_layers"], num_classes, found)
    names = hf_class_names(config) if task == "classification" else None
    if names and len(names) == found:
        meta["class_names"] = list(names)
        notes.append(f"class names from config.json id2label ({len(names)})")
    model = build_model(meta)
    state = from_hf_state_dict(hf_state, hf_source_keys(model, task, hf_state), task, str(path),
                               config["qv_bias"])
    weights = SourceWeights(task, state, notes)
    load_weights(model, weights, str(path))
    return ImportResult(model, weights.notes)


def hf_class_names(config: dict) -> list[str] | None:
    """id2label in index order, or None when it holds only transformers' LABEL_i defaults."""
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def hf_source_keys(model: nn.Module, task: str, hf_state: dict) -> list[str]:
    """Our keys that the HF file must provide: all, or for a bare encoder the encoder's
    (plus the final norm when the file has one)."""
    if task != "encoder":
        return list(model.state_dict())
    keys = [k for k in model.state_dict() if not k.startswith(("fc_norm.", "head."))]
    return keys + [k for k in ("norm.weight", "norm.bias") if hf_names(k, "encoder")[0] in hf_state]


def import_checkpoint(src: str | Path, **options) -> ImportResult:
    """A HF dir or an official .pth file (see import_hf / import_official for the options)."""
    src = Path(src)
    if (src / META_FILE).is_file():
        raise ValueError(f"{src} is already a vmaescale checkpoint directory; load it with load_model_dir")
    if src.is_dir():
        if options.pop("allow_pickle", False):
            raise ValueError("--allow-pickle applies to official .pth files, not Hugging Face dirs")
        return import_hf(src, **options)
    return import_official(src, **options)


# ---------------------------------------------------------------- Hugging Face export


def hf_config(meta: dict, dtype: torch.dtype = torch.float32) -> tuple[dict, list[str]]:
    """(config.json for transformers, notes) for a vmaescale meta.

    HF fixes eps 1e-5 for fc_norm (classifiers) and decoder.norm (pretraining); a model
    with another head_norm_eps (official-style 1e-6) exports with that norm at 1e-5. The
    cost is tiny: LayerNorm divides by sqrt(var + eps), so outputs move by about
    (1e-5 - eps) / (2 var) relative (~5e-6 for unit-variance features), not bitwise equal.
    """
    if meta.get("temporal", "full") != "full":
        raise ValueError(f"a {meta['temporal']!r} classifier (the control that encodes frames alone) has no "
                         "transformers equivalent; only temporal='full' models export")
    size = ModelSize.from_dict(meta["size"])
    task = meta["task"]
    config = {
        "architectures": [HF_ARCHITECTURES[task]], "model_type": "videomae",
        "image_size": meta["image_size"], "patch_size": size.patch_size, "num_channels": 3,
        "num_frames": meta["num_frames"], "tubelet_size": size.tubelet_size,
        "hidden_size": size.embed_dim, "num_hidden_layers": size.depth,
        "num_attention_heads": size.num_heads, "intermediate_size": size.mlp_hidden,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": size.norm_eps, "qv_bias": True,
        "use_mean_pooling": task == "classification", "norm_pix_loss": True,
        "decoder_hidden_size": size.decoder_dim, "decoder_num_attention_heads": size.decoder_heads,
        "decoder_intermediate_size": size.decoder_mlp_hidden,
        "decoder_num_hidden_layers": meta.get("decoder_depth", 0),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if task == "classification":
        names = meta.get("class_names") or [f"LABEL_{i}" for i in range(meta["num_classes"])]
        labels = {str(i): str(name) for i, name in enumerate(names)}
        config |= {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
    notes = [f"architecture {HF_ARCHITECTURES[task]}, layer_norm_eps {size.norm_eps}"]
    if size.head_norm_eps != HF_HEAD_NORM_EPS:
        norm = "decoder.norm" if task == "pretrain" else "fc_norm"
        notes.append(f"{norm} eps {size.head_norm_eps} is not expressible in HF (fixed {HF_HEAD_NORM_EPS}); "
                     "HF outputs differ by ~1e-5 relative")
    return config, notes


def export_hf(ckpt_dir_or_model: str | Path | nn.Module, out_dir: str | Path) -> list[str]:
    """Write config.json + model.safetensors loadable by transformers; returns notes."""
    if isinstance(ckpt_dir_or_model, nn.Module):
        model = unwrap(ckpt_dir_or_model)
    else:
        model = load_model_dir(ckpt_dir_or_model)
    meta = model_meta(model)
    tensors = to_hf_state_dict(model.state_dict(), meta["task"])
    config, notes = hf_config(meta, next(iter(tensors.values())).dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return notes
