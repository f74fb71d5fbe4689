"""fxcc's own decode loop for `CompiledModule.generate`: greedy decoding or sampling with a static KV cache, one
compiled step per token.

transformers' generate prepares the call as it always does (generation config, special tokens, position ids, the
StaticCache, logits processors and stopping criteria) and then hands its decoding loop to `DecodeLoop.decode`
(its `custom_generate` hook). Where the call is one fxcc runs exactly, the prefill runs through the compiled model
and every later token is one call of a compiled `DecodeStep`: the model's forward on the last token, the token's
choice (the argmax, or generate's sampling warpers and a draw from the global generator, in eager's order), the
end-of-sequence bookkeeping and the next step's inputs (the token written into the output, the position, the
position ids), all written in place into tensors the loop keeps, so a step takes the same tensors every time (one
CUDA-graph replay on the GPU) and the host does nothing else per token. The finished-rows flag is read back every
`STOP_CHECK_EVERY` steps (a copy queued behind the step, read a check later on CUDA, so the host never waits on
the device); the steps run past a finished batch write only padding, which is cut off, so the ids are HF's. A
streamer is handed each new token as transformers' loop hands it (a CPU copy of the batch's token, padding in
finished rows; generate itself puts the prompt), the flag then read after every step so none past the end reaches
it, and `end()` once the loop is done.
On CUDA a generate's state lives where the last generate's did (`_Reuse`): the StaticCache generate made for the
call is swapped, before the prefill, for the last generate's own (emptied, where its layers, lengths, batch, dtype and
device are the new one's), and the loop's tensors are copied into the memory the last generate's had, so the prefill
and every step replay the CUDA graphs captured on those tensors, with no copy in or out per step and no new capture
(a caller's own cache is left as it is).
Anything else (beam search, synced_gpus, logits processors or stopping criteria fxcc does not build, a dynamic
cache, scores in the output...) runs transformers' own loop, and `DecodeLoop.last` says which loop ran and why
(and what it raised, where generate raised).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .capture import original_forward

log = logging.getLogger(__name__)

STOP_CHECK_EVERY = 8  # decode steps between two reads of the finished-rows flag
REUSE_DEVICES = ("cuda",)  # where a generate's state takes the last generate's memory (what CUDA graphs replay on)
# devices fxcc's loop has been checked on (CUDA: tests/test_decode_loop_gpu.py, its step one CUDA-graph replay);
# FXCC_DECODE_LOOP=all lets it run on any
CHECKED_DEVICES = ("cpu", "cuda")
# generate's arguments that its `custom_generate` hook would not hand on to the decoding loop, or that choose a loop
HF_ONLY = ("assistant_model", "custom_generate", "prefix_allowed_tokens_fn", "negative_prompt_ids",
           "negative_prompt_attention_mask", "synced_gpus", "tokenizer", "assistant_tokenizer", "trust_remote_code")
MODEL_KWARGS = {"cache", "attention_mask", "position_ids", "use_cache", "logits_to_keep"}  # what the step rebuilds
# logits warpers generate builds for sampling that read only the scores: the step calls them itself
WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")
# the warpers' float settings a step takes as inputs (a tensor of them), so a new temperature, top-p or min-p reuses
# the compiled step; the warper runs as transformers wrote it, on a copy that holds the input in place of the float
KNOBS = {"TemperatureLogitsWarper": "temperature", "TopPLogitsWarper": "top_p", "MinPLogitsWarper": "min_p"}
HF_PATH = "transformers' generate loop"
FXCC_PATH = "fxcc's decode loop"


def choose(logits: torch.Tensor, warpers: tuple | None, knobs: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row from the last position's logits, as transformers' `_sample` chooses it: the
    argmax (`warpers` None), or a draw from the softmax of the scores generate's sampling warpers leave; `knobs`
    (`knob_values`) replace the warpers' float settings named in KNOBS, in order."""
    scores = logits[:, -1].float()
    if warpers is None:
        return scores.argmax(-1)
    i = 0
    for warper in warpers:
        name = KNOBS.get(type(warper).__name__)
        if knobs is not None and name is not None:
            warper = copy.copy(warper)
            setattr(warper, name, knobs[i])  # a float64 0-dim tensor: torch promotes it as it does the float
            i += 1
        scores = warper(None, scores)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def knob_values(warpers: tuple | None, device: torch.device) -> torch.Tensor:
    """The warpers' float settings named in KNOBS, in order, as a float64 tensor (a step's input)."""
    values = [float(getattr(w, KNOBS[type(w).__name__])) for w in warpers or () if type(w).__name__ in KNOBS]
    return torch.tensor(values, dtype=torch.float64, device=device)


class DecodeStep(nn.Module):
    """One decode step with everything it changes written in place: reads the last token from `seq` at `pos`,
    attends over the static cache's keys at or before `pos` that `pad_mask` keeps, writes the chosen token
    (padding in finished rows) at `pos + 1`, marks the rows that chose an end-of-sequence token finished, and
    advances `pos` and `position_ids`. Its graph is the whole step: no host work between two steps."""

    def __init__(self, model: nn.Module, logits_to_keep: bool, eos: bool, warpers: tuple | None):
        super().__init__()
        self.model = model
        self.logits_to_keep = logits_to_keep
        self.eos = eos
        # by position in a dict, not a tuple: the step's guard watches a dict's warpers by their settings, a tuple of
        # objects only by its identity, with a warning about state that is fxcc's own and never changes
        self.warpers = None if warpers is None else dict(enumerate(warpers))

    def forward(self, seq: torch.Tensor, pos: torch.Tensor, position_ids: torch.Tensor, pad_mask: torch.Tensor,
                unfinished: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor, knobs: torch.Tensor,
                cache: Any) -> None:
        ids = seq.index_select(1, pos)
        keys = torch.arange(pad_mask.shape[1], device=pad_mask.device)
        mask = (pad_mask & (keys <= pos))[:, None, None, :]  # generate's 4-D mask for a static cache (sdpa)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        # the model's own forward: generate routes the instance's to the compiled model while it runs
        out = original_forward(self.model)(input_ids=ids, cache=cache, position_ids=position_ids,
                                           attention_mask=mask, use_cache=True, return_dict=True, **extra)
        tokens = choose(out.logits, None if self.warpers is None else tuple(self.warpers.values()), knobs)
        if self.eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
            unfinished.copy_(unfinished & ~torch.isin(tokens, eos))
        seq.index_copy_(1, pos + 1, tokens[:, None])
        pos.add_(1)
        position_ids.add_(1)


class DecodeLoop:
    """The decode loop of one compiled model: its compiled step (built at the first generate that uses it) and
    which loop the last generate ran, with the reason (`last`)."""

    def __init__(self, model: nn.Module, compile_step: Callable[[nn.Module], Callable]):
        self.model = model
        self.compile_step = compile_step
        self.steps: dict[tuple, Callable] = {}  # (logits_to_keep, eos, warpers' settings) -> compiled DecodeStep
        self.last: tuple[str, str] | None = None  # (path, why) of the last generate
        self.every = STOP_CHECK_EVERY
        self.enabled = True  # False: every generate runs transformers' loop (a baseline to compare with)
        self.devices = None if os.environ.get("FXCC_DECODE_LOOP", "") == "all" else CHECKED_DEVICES
        self.reuse = _Reuse(REUSE_DEVICES)

    def text(self) -> str:
        """For `fxcc explain`: which loop the last generate ran, and why ("" before any generate)."""
        return f"== generate: {self.last[0]} ({self.last[1]})" if self.last else ""

    def generate(self, gen: Callable, args: tuple, kwargs: dict) -> Any:
        """Run `gen` (the model's generate) with fxcc's loop where the call allows it, else as it is."""
        self.last = None  # a generate that fails before its loop is chosen leaves no earlier call's report
        why = self.hf_reason(args, kwargs)
        try:
            if why is not None:
                self._ran(HF_PATH, why)
                return gen(*args, **kwargs)
            # generate puts the prompt into a streamer but does not hand it on to a custom hook: the hook is given it
            hook = functools.partial(self.decode, streamer=kwargs.get("streamer"))
            return gen(*args, custom_generate=hook, **kwargs)
        except Exception as e:
            self._raised(e)
            raise

    def _ran(self, path: str, why: str) -> None:
        self.last = (path, why)
        log.info("generate of %s: %s (%s)", type(self.model).__name__, path, why)

    def _raised(self, error: Exception) -> None:
        """The generate raised: `last` says so (and where), never that a loop ran."""
        text = str(error).strip().splitlines()
        what = f"raised {type(error).__name__}" + (f": {text[0][:200]}" if text else "")
        if self.last is None:
            self.last = ("transformers' generate", f"{what} (before a decoding loop was chosen)")
        else:
            self.last = (self.last[0], f"{self.last[1]}; {what}")
        log.info("generate of %s: %s (%s)", type(self.model).__name__, *self.last)

    def hf_reason(self, args: tuple, kwargs: dict) -> str | None:
        """Why this generate call goes to transformers' loop as a whole, judged from its arguments; None: it may
        run fxcc's loop (the decoding method checks the rest once generate has prepared the call)."""
        model = self.model
        if not self.enabled:
            return "fxcc's loop turned off (decode_loop.enabled = False)"
        given = [k for k in HF_ONLY if kwargs.get(k) is not None]
        if given:
            return f"generate was given {', '.join(given)}"
        if getattr(model.config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:  # generate may sync its ranks' loops (synced_gpus)
            return "a distributed run (generate may keep its ranks' loops in step)"
        if not hasattr(model, "_prepare_generation_config") or "custom_generate" not in inspect.signature(
                model.generate).parameters:
            return "this transformers' generate has no custom decoding hook"
        if kwargs.get("cache_implementation") == "paged":
            return "continuous batching (cache_implementation='paged')"
        if len(args) > 2 or (len(args) == 2 and args[1] is not None):
            return "generate was given positional arguments past the inputs"
        try:
            config, _ = model._prepare_generation_config(kwargs.get("generation_config"), **{
                k: v for k, v in kwargs.items() if k != "generation_config"})
            mode = config.get_generation_mode(None)
        except Exception as e:  # generate itself reports it
            return f"its generation config did not resolve ({type(e).__name__})"
        if mode.value not in ("greedy_search", "sample"):
            return f"{mode.value} (fxcc's loop decodes greedily or samples)"
        return None

    def decode(self, model: nn.Module, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
               generation_config: Any, synced_gpus: bool = False, streamer: Any = None, **model_kwargs: Any) -> Any:
        """generate's decoding loop (its `custom_generate` hook): fxcc's where it is exact, else transformers'."""
        why = self.loop_reason(model, input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus, streamer, model_kwargs)
        if why is not None:
            self._ran(HF_PATH, why)
            return type(model)._sample(model, input_ids, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria, generation_config=generation_config,
                                       synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        sample = generation_config.do_sample
        self._ran(FXCC_PATH, f"{'sampling' if sample else 'greedy decoding'} with a static cache")
        warpers = tuple(logits_processor) if sample else None
        return self._loop(model, input_ids, stopping_criteria, generation_config, model_kwargs, warpers, streamer)

    def loop_reason(self, model: nn.Module, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                    generation_config: Any, synced_gpus: bool, streamer: Any, model_kwargs: dict) -> str | None:
        """Why the prepared call needs transformers' loop; None: fxcc's loop gives the same ids."""
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        if self.devices is not None and input_ids.device.type not in self.devices:
            return (f"fxcc's loop is not yet checked on {input_ids.device.type} (FXCC_DECODE_LOOP=all runs it "
                    "there)")
        if synced_gpus:
            return "synced_gpus (ranks that keep their loops in step)"
        own = WARPERS if generation_config.do_sample else ()
        processors = [type(p).__name__ for p in logits_processor if type(p).__name__ not in own
                      or type(p).__module__ != "transformers.generation.logits_process"]
        if processors:
            return "logits processors " + ", ".join(processors)
        if any(not _settings(p) for p in logits_processor):
            return "a logits warper with settings other than numbers"
        other = [type(c).__name__ for c in stopping_criteria if type(c) not in (EosTokenCriteria, MaxLengthCriteria)]
        if other:
            return "stopping criteria " + ", ".join(other)
        if generation_config.return_dict_in_generate:
            return "return_dict_in_generate (scores, logits or the cache in the output)"
        if generation_config.prefill_chunk_size is not None:
            return "chunked prefill"
        extra = sorted(k for k, v in model_kwargs.items() if k not in MODEL_KWARGS and v is not None)
        if extra:
            return "model inputs " + ", ".join(extra)
        if not model_kwargs.get("use_cache", True):
            return "use_cache=False"
        cache = model_kwargs.get("cache")
        if type(cache) is not StaticCache:
            return (f"a {type(cache).__name__} (fxcc's loop runs on a static cache: cache_implementation='static' "
                    "or a StaticCache)")
        # a window at least as long as its layer's cache (is_croppable) never slides: the model attends as with full
        # causal attention, the mask a step passes (the generation fits the cache, checked below)
        if not all(type(layer) is StaticLayer or type(layer) is StaticSlidingWindowLayer and layer.is_croppable
                   for layer in cache.layers):
            return "a static cache with sliding-window layers shorter than the cache"
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            return f"attention implementation {getattr(model.config, '_attn_implementation', None)!r} (not sdpa)"
        if getattr(model.config, "alibi", False):  # Falcon's: its biases come from the 2-D mask a step does not pass
            return "ALiBi biases built from the 2-D attention mask (a step passes a 4-D one)"
        if getattr(model, "create_masks_for_generate", None) is not None:
            return f"{type(model).__name__} builds its own generation masks"
        if model._forward_hooks or model._forward_pre_hooks:
            return "forward hooks on the model"
        if model_kwargs.get("position_ids") is None:
            return "the model takes no position_ids"
        mask = model_kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
            return "an attention mask that is not 2-D over the inputs"
        if input_ids.device != model.device:
            return "inputs on another device than the model"
        length, total = input_ids.shape[1], generation_config.max_length
        if total <= length:
            return "max_length not past the prompt"
        if cache.get_max_length() < total - 1:
            return "a static cache smaller than the generation"
        if cache.get_seq_length() != 0:
            return "a static cache that already holds tokens"
        return None

    def _loop(self, model: nn.Module, input_ids: torch.Tensor, stopping_criteria: Any, generation_config: Any,
              model_kwargs: dict, warpers: tuple | None, streamer: Any) -> torch.Tensor:
        from transformers.generation.stopping_criteria import EosTokenCriteria

        batch, length = input_ids.shape
        total, device = generation_config.max_length, input_ids.device
        cache = model_kwargs["cache"]
        eos = next((c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)), None)
        pad = generation_config._pad_token_tensor
        if eos is not None:
            eos = eos.to(device)
            pad = pad.to(device) if pad is not None else torch.zeros((), dtype=torch.long, device=device)
        with self.reuse.taken(device) as reuse:
            if reuse is not None and not getattr(cache, "_is_user_defined", False):  # generate's own cache
                cache = model_kwargs["cache"] = self.reuse.cache_for(cache, input_ids, model)
            # the prefill, as transformers runs it: through the compiled model
            with model._optimize_model_for_decode():
                outputs = model._prefill(input_ids, generation_config, model_kwargs)
            tokens = choose(outputs.logits, warpers)
            del outputs
            if streamer is not None:  # generate put the prompt before its decoding loop
                streamer.put(tokens.cpu())
            seq = input_ids.new_zeros((batch, total))
            seq[:, :length] = input_ids
            seq[:, length] = tokens
            unfinished = torch.ones(batch, dtype=torch.long, device=device)
            if eos is not None:
                unfinished &= ~torch.isin(tokens, eos)
            steps = total - length - 1
            if steps:
                if reuse is not None:
                    seq, unfinished = reuse("seq", seq), reuse("unfinished", unfinished)
                self._decode(model, seq, length, steps, unfinished, eos, pad, cache, model_kwargs, warpers, streamer,
                             reuse)
            if streamer is not None:
                streamer.end()
            if eos is not None:
                done = torch.isin(seq[:, length:], eos).cummax(1).values.all(0)  # the batch has finished after each
                ends = done.nonzero()  # token
                if len(ends):
                    seq = seq[:, :length + int(ends[0]) + 1]
            # the ids are the caller's: never memory the next generate writes
            return seq.clone() if reuse is not None else seq

    def _decode(self, model: nn.Module, seq: torch.Tensor, length: int, steps: int, unfinished: torch.Tensor,
                eos: torch.Tensor | None, pad: torch.Tensor | None, cache: Any, model_kwargs: dict,
                warpers: tuple | None, streamer: Any, reuse: Callable | None) -> None:
        device = seq.device
        keep = model._supports_logits_to_keep()
        # a step per kind of call: the warpers' numbers are constants of its graph, but for their KNOBS (inputs)
        key = (keep, eos is not None, None if warpers is None else tuple(_settings(w) for w in warpers))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self.compile_step(DecodeStep(model, keep, eos is not None, warpers))
        mask = model_kwargs.get("attention_mask")
        pad_mask = torch.ones((seq.shape[0], cache.get_max_length()), dtype=torch.bool, device=device)
        if mask is not None:
            pad_mask[:, :length] = mask.bool()
        pos = torch.tensor([length], device=device)
        position_ids = (model_kwargs["position_ids"][:, -1:] + 1).contiguous()
        if eos is None:  # the step's graph ignores them
            eos = pad = torch.zeros((), dtype=torch.long, device=device)
        knobs = knob_values(warpers, device)
        if reuse is not None:  # the step's other tensors where the last generate's were: its graph's own inputs
            pad_mask, pos, position_ids = reuse("pad_mask", pad_mask), reuse("pos", pos), reuse("position_ids",
                                                                                              position_ids)
            eos, pad, knobs = reuse("eos", eos), reuse("pad", pad), reuse("knobs", knobs)
        # no step past the batch's end where it would show: in the caller's cache (theirs after generate), in the
        # global generator (a step that samples draws from it, eager's loop stops drawing at the end), or in a
        # streamer (handed each token as eager's loop hands it, none past the end)
        shows = getattr(cache, "_is_user_defined", False) or warpers is not None or streamer is not None
        every = 1 if shows else self.every
        flag = _Flag(device, queued=every > 1)
        if key[1] and every == 1 and flag.finished(unfinished):  # every row ended at the prefill's token
            return
        with model._optimize_model_for_decode():
            for i in range(steps):
                step(seq, pos, position_ids, pad_mask, unfinished, eos, pad, knobs, cache)
                if streamer is not None:  # the step's token, padding in finished rows, a copy the streamer keeps
                    streamer.put(seq[:, length + 1 + i].to("cpu", copy=True))
                if key[1] and (i + 1) % every == 0 and i + 1 < steps and flag.finished(unfinished):
                    break


def _same_cache(kept: Any, new: Any, input_ids: torch.Tensor, model: nn.Module) -> bool:
    """Whether `kept` (a filled StaticCache) has the layers, lengths, batch, dtype and device that `new` (an empty one
    generate made for this call) takes at the prefill: the model's dtype, the inputs' device."""
    if type(kept) is not type(new) or len(kept.layers) != len(new.layers):
        return False
    for a, b in zip(kept.layers, new.layers):
        if type(a) is not type(b) or not getattr(a, "is_initialized", False) or getattr(b, "is_initialized", False):
            return False
        if a.max_cache_len != b.max_cache_len or getattr(a, "sliding_window", None) != getattr(b, "sliding_window",
                                                                                               None):
            return False
        keys = getattr(a, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[0] != input_ids.shape[0] or \
                keys.device != input_ids.device or keys.dtype != getattr(model, "dtype", None):
            return False
    return True


def _cache_heads(model: nn.Module, device: torch.device) -> list[tuple[int, int, int]]:
    """Each cache layer's (heads, key dim, value dim) as the model's attention writes them: one token through the
    model's own forward into a StaticCache of one position, which its layers make from the states they are given.
    transformers' `_get_static_cache_init_shape` reads them from the config instead, whose `num_key_value_heads` a
    model may not read (GPT-2 keeps all its heads): a cache made from it is refused by the model's first write.
    [] where the forward fails (each generate's own cache then)."""
    from transformers import StaticCache

    probe = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=1)
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            original_forward(model)(input_ids=ids, cache=probe, use_cache=True, return_dict=True)
    except Exception as e:  # noqa: BLE001 - the model decides; its own generate reports its own errors
        log.info("the cache layers of %s were not found (%s: %s); each generate makes its own cache",
                 type(model).__name__, type(e).__name__, e)
        return []
    layers = [getattr(layer, "keys", None) for layer in probe.layers]
    if not all(isinstance(k, torch.Tensor) and k.dim() == 4 for k in layers):
        return []
    return [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in probe.layers]


class _Reuse:
    """The memory of the last generate's state, per name: `taken(device)` gives, on the devices it serves (and while
    no other generate of this loop holds it), a function `reuse(name, tensor)` that returns the tensor kept under
    `name` with `tensor`'s values copied in, where its shape, dtype and device match, else a copy of `tensor`, kept
    for the next generate. Elsewhere it gives None (each generate's own tensors)."""

    def __init__(self, devices: tuple[str, ...]):
        self.devices = devices
        self.kept: dict[Any, torch.Tensor] = {}
        self.cache: Any = None  # the StaticCache of the last generate that made its own
        self.heads: list[tuple[int, int, int]] | None = None  # _cache_heads of the model, found at the first generate
        self.busy = False  # a generate inside another's (a streamer's) or beside it uses its own tensors

    def cache_for(self, new: Any, input_ids: torch.Tensor, model: nn.Module) -> Any:
        """The cache this generate runs on: the last generate's, emptied, where it is what `new` (a StaticCache
        generate made, its layers not yet made) will be once the prefill makes them, else `new` with its layers made
        now (the heads and dims the model's attention writes, `_cache_heads`, in the model's dtype), kept for the
        next."""
        kept = self.cache
        if kept is not None and kept is not new and _same_cache(kept, new, input_ids, model):
            kept.reset()
            return kept
        # filled before the prefill, as the cache every later generate hands it: one kind of call, one compile
        if any(getattr(layer, "is_initialized", True) or not getattr(layer, "supports_early_init", False)
               for layer in new.layers):
            return new  # not one transformers can fill ahead: each generate's own
        if self.heads is None:
            self.heads = _cache_heads(model, input_ids.device)
        if not self.heads or len(self.heads) != len(new.layers):
            return new
        for layer, (heads, key_dim, value_dim) in zip(new.layers, self.heads):
            # as transformers' `early_initialization` fills a layer: from states with no positions
            shape = (input_ids.shape[0], heads, 0)
            layer.lazy_initialization(torch.zeros((*shape, key_dim), dtype=model.dtype, device=input_ids.device),
                                      torch.zeros((*shape, value_dim), dtype=model.dtype, device=input_ids.device))
        self.cache = new
        return new

    def _reuse(self, name: Any, tensor: torch.Tensor) -> torch.Tensor:
        old = self.kept.get(name)
        if old is not None and old.shape == tensor.shape and old.dtype == tensor.dtype and \
                old.device == tensor.device and old.stride() == tensor.stride() and old.data_ptr() != tensor.data_ptr():
            return old.copy_(tensor)
        # a copy: the tensor may be the caller's (end and pad tokens passed as tensors), which a later generate's
        # values must never overwrite
        self.kept[name] = tensor = tensor.clone()
        return tensor

    @contextlib.contextmanager
    def taken(self, device: torch.device) -> Iterator[Callable | None]:
        if self.busy or device.type not in self.devices:
            yield None
            return
        self.busy = True
        try:
            yield self._reuse
        finally:
            self.busy = False


def _settings(warper: Any) -> tuple:
    """A logits warper's class and settings (its KNOBS setting left out: a step's input), () where a setting is not a
    number or a bool."""
    items = sorted(vars(warper).items())
    if not all(isinstance(v, (int, float, bool)) for _, v in items):
        return ()
    knob = KNOBS.get(type(warper).__name__)
    return (type(warper).__name__, *((k, v) for k, v in items if k != knob))


class _Flag:
    """Whether every row has finished, read from the device: on CUDA a copy queued behind the last step and read
    one check later (the host never waits for the step it just queued); elsewhere at once."""

    def __init__(self, device: torch.device, queued: bool):
        self.queued = queued and device.type == "cuda"
        self.pending: tuple[torch.Tensor, Any] | None = None

    def finished(self, unfinished: torch.Tensor) -> bool:
        if not self.queued:
            return not bool(unfinished.any())
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(unfinished.any().logical_not(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        before, self.pending = self.pending, (host, event)
        if before is None:
            return False
        before[1].synchronize()
        return bool(before[0])
