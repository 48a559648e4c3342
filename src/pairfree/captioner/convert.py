"""Import original ClipCap / CapDec checkpoints.

Those are ``torch.save(model.state_dict())`` of ClipCap's ``ClipCaptionModel``: ``gpt.*`` is a
``GPT2LMHeadModel`` and ``clip_project.*`` the mapper. Our mappers keep ClipCap's parameter
names, so importing is a rename (``gpt.`` -> ``lm.``, ``clip_project.`` -> ``mapper.``), with
every size read from the tensors themselves - except GPT-2's attention head count, which no
tensor shows: it is taken from the released GPT-2 sizes, or from the LM config the user gives
(whose other sizes the tensors must then match), and never guessed.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedConfig

from pairfree.captioner.config import CaptionerConfig
from pairfree.captioner.model import PrefixCaptioner
from pairfree.errors import BadInputError, first_line

# the released GPT-2 sizes, (width, layers) -> attention heads: the head count is the one size
# a state dict does not show, so it is inferred only for these
RELEASED_GPT2_HEADS = {(768, 12): 12, (1024, 24): 16, (1280, 36): 20, (1600, 48): 25}
LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers old GPT-2 versions saved


def import_clipcap_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    mapper: str | None = None,
    prefix_length: int | None = None,
    clip_length: int | None = None,
    num_layers: int | None = None,
    lm_config: PreTrainedConfig | None = None,
) -> PrefixCaptioner:
    """Build a :class:`PrefixCaptioner` (eval mode) from an original ClipCap state dict.

    Sizes left as ``None`` are read from the tensors; the ones given are checked against them.
    Without ``lm_config`` the LM is GPT-2 with sizes read from the tensors.
    """
    lm_state = _strip(state_dict, "gpt.")
    mapper_state = _strip(state_dict, "clip_project.")
    other = sorted(k for k in state_dict if not k.startswith(("gpt.", "clip_project.")))
    if other:
        raise ValueError(f"keys outside gpt.* and clip_project.*: {other[:5]}")
    if not lm_state or not mapper_state:
        raise ValueError("not a ClipCap state dict: it needs both gpt.* and clip_project.* keys")

    if lm_config is None:
        lm_config = _gpt2_config(lm_state)
    lm = AutoModelForCausalLM.from_config(lm_config)
    hidden_size = lm.get_input_embeddings().weight.shape[1]
    config = _captioner_config(
        mapper_state,
        hidden_size,
        mapper=mapper,
        prefix_length=prefix_length,
        clip_length=clip_length,
        num_layers=num_layers,
    )
    model = PrefixCaptioner(config, lm=lm)
    _load_lm(lm, lm_state)
    try:
        model.mapper.load_state_dict(mapper_state)
    except RuntimeError as e:
        raise ValueError(
            f"clip_project.* does not match a ClipCap {config.mapper} mapper: {e}"
        ) from e
    return model.eval()


def load_original_checkpoint(path: str | Path, **kwargs) -> PrefixCaptioner:
    """Read an original ClipCap/CapDec ``.pt`` (tensors only, never arbitrary pickles) and import
    it; ``kwargs`` go to :func:`import_clipcap_state_dict`."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols mean nothing here
            warnings.simplefilter("ignore", UserWarning)
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own advice (weights_only=False) would run it
        raise BadInputError(
            path,
            "not tensors saved by torch.save (anything else is refused unread: nothing in "
            "it was run)",
        ) from None
    except EOFError:
        raise BadInputError(path, "empty or cut short") from None
    except (OSError, RuntimeError) as e:
        raise BadInputError(path, f"cannot read the checkpoint: {first_line(e)}") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise BadInputError(path, "not a state dict (a mapping of names to tensors)")
    try:
        return import_clipcap_state_dict(state_dict, **kwargs)
    except ValueError as e:
        raise BadInputError(path, str(e)) from e


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _tensor(state: dict[str, torch.Tensor], key: str, prefix: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing key {prefix}{key}")
    return state[key]


def _layer_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if not indices:
        raise ValueError(f"no {prefix}* keys")
    return max(indices) + 1


def _gpt2_config(lm_state: dict[str, torch.Tensor]) -> GPT2Config:
    """GPT-2's config read off its tensors; the head count only for a released size."""
    wte = _tensor(lm_state, "transformer.wte.weight", "gpt.")
    wpe = _tensor(lm_state, "transformer.wpe.weight", "gpt.")
    n_embd, n_layer = wte.shape[1], _layer_count(lm_state, "transformer.h.")
    n_head = RELEASED_GPT2_HEADS.get((n_embd, n_layer))
    if n_head is None:
        raise ValueError(
            f"gpt.* is a {n_layer}-layer, {n_embd}-wide GPT-2, not a released size, and its "
            "attention head count cannot be read from the tensors: give the LM's config "
            "(--lm-config DIR_OR_HUB_ID)"
        )
    return GPT2Config(
        vocab_size=wte.shape[0],
        n_positions=wpe.shape[0],
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=_tensor(lm_state, "transformer.h.0.mlp.c_fc.weight", "gpt.").shape[1],
    )


def _agree(name: str, given: int | str | None, found: int | str) -> int | str:
    if given is not None and given != found:
        raise ValueError(f"{name}={given!r} was given but the checkpoint has {name}={found!r}")
    return found


def _captioner_config(
    mapper_state: dict[str, torch.Tensor],
    hidden_size: int,
    *,
    mapper: str | None,
    prefix_length: int | None,
    clip_length: int | None,
    num_layers: int | None,
) -> CaptionerConfig:
    kind = _agree("mapper", mapper, "transformer" if "prefix_const" in mapper_state else "mlp")
    if kind == "mlp":
        first = _tensor(mapper_state, "model.0.weight", "clip_project.")
        last = _tensor(mapper_state, "model.2.weight", "clip_project.")
        if last.shape[0] % hidden_size:
            raise ValueError(f"mapper output {last.shape[0]} is not a multiple of {hidden_size}")
        return CaptionerConfig(
            embed_dim=first.shape[1],
            prefix_length=_agree("prefix_length", prefix_length, last.shape[0] // hidden_size),
            mapper="mlp",
        )
    linear = _tensor(mapper_state, "linear.weight", "clip_project.")
    if linear.shape[0] % hidden_size:
        raise ValueError(
            f"mapper input projection {linear.shape[0]} is not a multiple of {hidden_size}"
        )
    return CaptionerConfig(
        embed_dim=linear.shape[1],
        prefix_length=_agree("prefix_length", prefix_length, mapper_state["prefix_const"].shape[0]),
        mapper="transformer",
        mapper_layers=_agree(
            "num_layers", num_layers, _layer_count(mapper_state, "transformer.layers.")
        ),
        clip_length=_agree("clip_length", clip_length, linear.shape[0] // hidden_size),
    )


def _load_lm(lm: torch.nn.Module, lm_state: dict[str, torch.Tensor]) -> None:
    """Load ``gpt.*`` into the LM; tied weights may be absent (but must agree where present),
    legacy mask buffers are dropped."""
    own = lm.state_dict()
    state = {k: v for k, v in lm_state.items() if k in own or not k.endswith(LEGACY_BUFFERS)}
    try:
        result = lm.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"gpt.* does not match the LM config: {e}") from e
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"gpt.* does not match the LM: missing {missing[:5]}, "
            f"unexpected {['gpt.' + k for k in result.unexpected_keys[:5]]}"
        )
    differ = [k for k in state if not torch.equal(own[k], state[k].to(own[k].dtype))]
    if differ:
        raise ValueError(
            f"tied weights differ in the checkpoint: {['gpt.' + k for k in differ[:5]]}"
        )
