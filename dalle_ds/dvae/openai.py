"""OpenAI's released dVAE (openai/DALL-E, PyPI `dall-e`) as our `DVAE`, so stage 1 can be skipped.

OpenAI published `encoder.pkl` and `decoder.pkl`: whole `nn.Module` objects of the classes
`dall_e.encoder.Encoder` / `dall_e.decoder.Decoder` written with `torch.save`. Reading them the way their
README does (`torch.load`, weights_only=False) imports `dall_e` and runs whatever the pickle asks for, so a
file from anywhere could execute code. Here they are read by `_RestrictedUnpickler` instead (Python's
"restricting globals" recipe, handed to `torch.load` as its `pickle_module`, which serves torch's zip and
legacy formats alike):

* the only callables it hands the pickle are torch's tensor rebuilders (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_tensor`, `_rebuild_parameter`, `_rebuild_parameter_with_state`), `collections.OrderedDict`,
  `set`/`frozenset`, `torch.device` and `torch.Size`, all of which torch's own weights_only loader allows too;
  storages (`torch.FloatStorage`, ...) are resolved by torch's loader before the unpickler is asked;
* a class under `dall_e.` or `torch.nn.modules.` becomes an inert `_Stub` that only records its arguments
  and the state the pickle sets (the module's `__dict__`: `_parameters`, `_buffers`, `_modules`), which is
  walked into a state dict; nothing of `dall_e` or `torch.nn` is imported or run;
* every other global (`os.system`, `builtins.eval`, `subprocess.*`, ...) is refused with an error naming the
  file and the global.

Files that already hold a state dict (`torch.save(module.state_dict())`, e.g. converted by the user) are read
with torch's own `weights_only=True` loader first. Only parameter tensors are taken from either kind of file.

The released decoder's `nn.Upsample` modules break on torch >= 1.11 when unpickled whole (they lack the
`recompute_scale_factor` attribute that newer torch reads in forward; openai/DALL-E#54). No module is rebuilt
here, only the state dicts are used, so that does not matter: our `Decoder` does the same nearest x2
upsampling.

Key mapping: our `Encoder`/`Decoder` use the release's module names (model.py), so an official state dict
key maps to ours with the `encoder.`/`decoder.` prefix of `DVAE` and nothing else; every key and shape is
checked against a `DVAE` of the inferred config before loading. The release hard-codes 4 groups; n_hid,
n_blk_per_group, n_init, the channels and the vocabulary are read from the weights. The released weights give
the paper config (`DVAEConfig()` defaults: 256 px, n_hid 256, 4 groups x 2 blocks, n_init 128, K 8192) with
53,786,240 encoder and 43,829,766 decoder parameters.

Both sides agree on the rest of the recipe: the decoder outputs 2C = 6 maps (logit-Laplace mu, then ln b),
and pixels are mapped with eps = 0.1 (`dall_e.utils.map_pixels` = our `loss.map_pixels`). The release runs
its convs in fp16 on CUDA except the encoder's last and the decoder's first; ours keeps those two in fp32 too
and the rest follows the weights or autocast.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, DVAEConfig, ExperimentConfig, get_preset
from dalle_ds.dvae.model import DVAE

OPENAI_N_GROUPS = 4  # hard-coded in dall_e.encoder.Encoder / dall_e.decoder.Decoder
OPENAI_IMAGE_SIZE = 256  # the released model's training resolution (not stored in the weights)
OPENAI_ENCODER_PARAMS = 53_786_240
OPENAI_DECODER_PARAMS = 43_829_766
OPENAI_CLASSES = {"encoder": "dall_e.encoder.Encoder", "decoder": "dall_e.decoder.Decoder"}


class OpenAIImportError(ConfigError):
    """An OpenAI dVAE file cannot be used: missing, refused (hostile or unknown pickle content), or its
    weights do not fit. A ConfigError (so a ValueError) whose one-line message names the file."""


# ----------------------------------------------------------------------------------------------
# The restricted unpickler


def _allowed_callables() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,  # protocol 2 writes `__builtin__`
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "frozenset"): frozenset,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
    }
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            allowed[("torch._utils", name)] = fn
    return allowed


_ALLOWED = _allowed_callables()
_STUB_PREFIXES = ("dall_e.", "torch.nn.modules.")
_STUB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class _Stub:
    """Inert stand-in for a pickled class that is not imported: records constructor arguments and state."""

    _pickled_as = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        obj.__dict__["_stub_state"] = None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.__dict__["_stub_state"] = state

    def __repr__(self) -> str:
        return f"<stub of {self._pickled_as}>"


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualified: str) -> type:
    cls = _STUB_CLASSES.get(qualified)
    if cls is None:
        name = qualified.rsplit(".", 1)[-1]
        # a __module__ that names no module: torch's legacy loader looks up a module class's source to
        # compare it with the saved one, which then fails quietly instead of reading one of our files
        cls = type(
            name,
            (_Stub,),
            {
                "_pickled_as": qualified,
                "__module__": "<dalle_ds restricted unpickler>",
                "__qualname__": name,
                "dump_patches": False,  # never asked for: the source lookup fails first
            },
        )
        _STUB_CLASSES[qualified] = cls
    return cls


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        qualified = f"{module}.{name}"
        if (
            isinstance(module, str)
            and isinstance(name, str)
            and module.startswith(_STUB_PREFIXES)
            and _STUB_NAME.match(qualified)
        ):
            return _stub_class(qualified)
        raise RefusedPickle(
            f"refusing to unpickle the global {qualified} (only tensors and dall_e / torch.nn "
            f"module classes are read from these files)"
        )


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# what torch.load uses of its `pickle_module`: Unpickler (subclassed for storages) and load (legacy headers)
_PICKLE_SHIM = types.ModuleType("dalle_ds_restricted_pickle")
_PICKLE_SHIM.Unpickler = _RestrictedUnpickler
_PICKLE_SHIM.load = _restricted_load
_PICKLE_SHIM.UnpicklingError = pickle.UnpicklingError


def restricted_torch_load(path: str | Path):
    """`torch.load` of a file that may hold whole modules, through `_RestrictedUnpickler` (tensors on CPU).
    Raises RefusedPickle for a global outside the allowlist; modules come back as `_Stub` objects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy format: torch cannot find our stubs' "source" and says so
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_SHIM)


def _walk_module(stub: _Stub, where: str) -> dict[str, torch.Tensor]:
    """State dict (parameters and persistent buffers) of a stubbed module tree."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(obj, prefix: str, depth: int) -> None:
        if depth > 64 or id(obj) in seen:
            raise OpenAIImportError(f"{where}: the module tree is cyclic or deeper than 64 levels at {prefix!r}")
        seen.add(id(obj))
        state = obj._stub_state
        if not isinstance(state, Mapping):
            raise OpenAIImportError(
                f"{where}: {obj._pickled_as} at {prefix or '<root>'!r} has no module state (not a pickled nn.Module?)"
            )
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            tensors = state.get(group) or {}
            if not isinstance(tensors, Mapping):
                raise OpenAIImportError(f"{where}: {prefix}{group} is a {type(tensors).__name__}, not a mapping")
            for name, t in tensors.items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise OpenAIImportError(f"{where}: {prefix}{name} is a {type(t).__name__}, not a tensor")
                out[f"{prefix}{name}"] = t
        children = state.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise OpenAIImportError(f"{where}: {prefix}_modules is a {type(children).__name__}, not a mapping")
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, _Stub):
                raise OpenAIImportError(f"{where}: submodule {prefix}{name} is a {type(child).__name__}")
            visit(child, f"{prefix}{name}.", depth + 1)

    visit(stub, "", 0)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def read_openai_state_dict(path: str | Path, part: str) -> dict[str, torch.Tensor]:
    """The `part` ("encoder" or "decoder") weights in `path`: a released pickle of the whole module, or a
    state dict of it. Returns fresh fp32 CPU tensors keyed as in the release (`blocks.input.w`, ...)."""
    if part not in OPENAI_CLASSES:
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    path = Path(path)
    where = f"{path} ({part})"
    if not path.is_file():
        raise OpenAIImportError(f"{where}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # a plain state dict
    except Exception:  # noqa: BLE001 - a whole-module pickle; torch's safe loader refused it: read it restricted
        try:
            obj = restricted_torch_load(path)
        except RefusedPickle as e:
            raise OpenAIImportError(f"{where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file: say so in one line
            raise OpenAIImportError(f"{where}: not a readable torch file ({_first_line(e)})") from None
    if isinstance(obj, _Stub):
        expected = OPENAI_CLASSES[part]
        if obj._pickled_as != expected:
            other = [p for p, c in OPENAI_CLASSES.items() if c == obj._pickled_as]
            hint = f" (the {other[0]}: pass ENCODER then DECODER)" if other else ""
            raise OpenAIImportError(f"{where}: holds a pickled {obj._pickled_as}{hint}, expected {expected}")
        obj = _walk_module(obj, where)
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise OpenAIImportError(
            f"{where}: holds a {type(obj).__name__}, expected a pickled {OPENAI_CLASSES[part]} or its state dict"
        )
    out = {}
    for key, t in obj.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise OpenAIImportError(f"{where}: entry {key!r} is not a floating-point tensor")
        out[key] = t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# Key mapping, config, builder


def map_openai_key(part: str, key: str) -> str:
    """Official key -> ours: the release's module names are ours, under DVAE's `encoder.` / `decoder.`."""
    return f"{part}.{key}"


def _need(sd: dict[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Size:
    if key not in sd:
        raise OpenAIImportError(f"{where}: missing key {key} (not a dall_e state dict or module?)")
    if sd[key].ndim != ndim:
        raise OpenAIImportError(f"{where}: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dims")
    return sd[key].shape


def infer_openai_config(
    enc_sd: dict[str, torch.Tensor],
    dec_sd: dict[str, torch.Tensor],
    *,
    image_size: int = OPENAI_IMAGE_SIZE,
    enc_name: str = "encoder",
    dec_name: str = "decoder",
) -> DVAEConfig:
    """The DVAEConfig that official state dicts were built with (the release fixes 4 groups)."""
    n_hid, channels = _need(enc_sd, "blocks.input.w", 4, f"{enc_name} (encoder)")[:2]
    vocab = _need(enc_sd, "blocks.output.conv.w", 4, f"{enc_name} (encoder)")[0]
    n_init = _need(dec_sd, "blocks.input.w", 4, f"{dec_name} (decoder)")[0]
    n_blk = 0
    while f"blocks.group_1.block_{n_blk + 1}.res_path.conv_1.w" in enc_sd:
        n_blk += 1
    if n_blk == 0:
        raise OpenAIImportError(f"{enc_name} (encoder): missing key blocks.group_1.block_1.res_path.conv_1.w")
    return DVAEConfig(
        image_size=image_size,
        channels=int(channels),
        n_hid=int(n_hid),
        n_groups=OPENAI_N_GROUPS,
        n_blk_per_group=n_blk,
        n_init=int(n_init),
        vocab_size=int(vocab),
    )


def _check_against(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str, cfg: DVAEConfig
) -> None:
    arch = (
        f"n_hid={cfg.n_hid}, n_blk_per_group={cfg.n_blk_per_group}, n_init={cfg.n_init}, "
        f"vocab_size={cfg.vocab_size}, channels={cfg.channels}, inferred from the files"
    )
    missing = [k for k in expected if k not in got]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise OpenAIImportError(f"{where}: missing key {missing[0]}{more} ({arch})")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise OpenAIImportError(f"{where}: unexpected key {unexpected[0]}{more} ({arch})")
    for k, t in expected.items():
        if got[k].shape != t.shape:
            raise OpenAIImportError(f"{where}: {k} has shape {tuple(got[k].shape)}, expected {tuple(t.shape)} ({arch})")


def dvae_from_openai_state_dicts(
    enc_sd: dict[str, torch.Tensor],
    dec_sd: dict[str, torch.Tensor],
    *,
    image_size: int = OPENAI_IMAGE_SIZE,
    enc_name: str = "encoder",
    dec_name: str = "decoder",
) -> DVAE:
    """Our DVAE holding the official encoder / decoder state dicts (keys as in `dall_e`), every key and
    shape checked first. The names only label error messages."""
    cfg = infer_openai_config(enc_sd, dec_sd, image_size=image_size, enc_name=enc_name, dec_name=dec_name)
    try:
        # built on the CPU (about 1 s for the paper size; the first meta-device init costs ~4 s), its random
        # init drawn from a forked RNG so the caller's stream is left as it was, then replaced by `assign`
        with torch.random.fork_rng(devices=[]):
            shell = DVAE(cfg)
    except ValueError as e:
        raise OpenAIImportError(f"{enc_name}: the inferred config {cfg} is not buildable ({e})") from None
    for part, sd, name in (("encoder", enc_sd, enc_name), ("decoder", dec_sd, dec_name)):
        module = getattr(shell, part)
        _check_against(module.state_dict(), sd, f"{name} ({part})", cfg)
    state = {map_openai_key("encoder", k): v for k, v in enc_sd.items()}
    state.update({map_openai_key("decoder", k): v for k, v in dec_sd.items()})
    shell.load_state_dict(state, strict=True, assign=True)
    return shell.eval()


def load_openai_dvae(
    encoder_path: str | Path, decoder_path: str | Path, *, image_size: int = OPENAI_IMAGE_SIZE
) -> DVAE:
    """Our DVAE from OpenAI's `encoder.pkl` and `decoder.pkl` (or state dicts of those modules)."""
    enc_sd = read_openai_state_dict(encoder_path, "encoder")
    dec_sd = read_openai_state_dict(decoder_path, "decoder")
    return dvae_from_openai_state_dicts(
        enc_sd, dec_sd, image_size=image_size, enc_name=str(encoder_path), dec_name=str(decoder_path)
    )


def openai_experiment_config(dvae_cfg: DVAEConfig) -> ExperimentConfig:
    """The config written into dvae.pt: the paper preset ("12b") with this dVAE, and the prior's image grid,
    image vocabulary and conv window made to agree with it (for the released weights nothing changes)."""
    cfg = get_preset("12b")
    cfg.dvae = dataclasses.replace(dvae_cfg)
    cfg.data.image_size = dvae_cfg.image_size
    cfg.prior.image_grid = dvae_cfg.grid_size
    cfg.prior.image_vocab_size = dvae_cfg.vocab_size
    cfg.prior.conv_kernel = min(cfg.prior.conv_kernel, 2 * dvae_cfg.grid_size - 1)  # small grids only
    return cfg.validate()


def is_paper_config(cfg: DVAEConfig) -> bool:
    """True for the released model's architecture (max_log_b, a loss setting, is not compared)."""
    return dataclasses.replace(cfg, max_log_b=DVAEConfig().max_log_b) == DVAEConfig()
