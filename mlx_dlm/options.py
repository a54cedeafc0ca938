"""Decoding options: one `SamplerOptions` dataclass, its defaults and its one `check()`.

The CLI (`generate`, `chat`), the Python API (`generate`, `stream_generate`), the server and the benchmarks build
one; the sampler (`sample.py`) takes it. A new option is a field here (with its bounds in `check`), a flag in
`generate.setup_arg_parser` and, for the server, an entry in its field table. What each option does: `sample.py`.

A model directory may carry its own defaults (`sampling.json`, read by `io.load`: the fields in MODEL_FIELDS).
`options_for(model, given, drafter)` is what a call runs with: the model's defaults (`model_defaults`) with the
caller's own choices laid over them (`over_defaults`), and in speculative decoding the drafter's own draft_length
(`with_drafter`). The pace of decoding (PACE: steps, steps per block or a threshold) is one choice: a caller who
sets any part of it sets all of it, so `--steps 64` is never overruled by a model's default threshold.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

from .errors import UserError

if TYPE_CHECKING:
    import argparse

STRATEGIES = ("confidence", "margin", "entropy", "random", "left")
SCHEDULES = ("linear", "cosine")
CACHE_MODES = ("prefix", "dual")
DEFAULT_MAX_TOKENS = 128
DEFAULT_STEPS = 32
DEFAULT_TEMP = 1.0
DEFAULT_DRAFT_LENGTH = 4
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplerOptions:
    """How to decode (see `sample.py` for what each option does); `check()` refuses a bad value in one line."""

    max_tokens: int = DEFAULT_MAX_TOKENS  # positions to generate (a template's placeholders decide instead)
    steps: int = DEFAULT_STEPS  # denoising passes (diffusion)
    strategy: str = "confidence"  # which masked positions to commit first
    schedule: str = "linear"  # how many to commit per step
    temp: float = DEFAULT_TEMP  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh random seed
    num_samples: int = 1  # canvases decoded in one batch
    suffix: str = ""  # text the sample ends with (diffusion)
    template: str | None = None  # text with [MASK] placeholders to fill (diffusion)
    threshold: float | None = None  # commit every proposal with probability >= threshold (Fast-dLLM)
    block_length: int = 0  # semi-autoregressive blocks of this many positions (0: one block)
    cache: bool | str | None = False  # with blocks: "prefix" (True) or "dual" KV cache
    cache_refresh: int = 0  # with a cache: also recompute it every N steps
    remask: float = 0.0  # re-mask up to this fraction of committed tokens per step (ReMDM)
    alg_temp: float = 0.0  # draw the positions to commit from softmax(score / alg_temp) (Dream)
    cfg_scale: float = 0.0  # classifier-free guidance (LLaDA)
    draft_length: int = DEFAULT_DRAFT_LENGTH  # speculative decoding: tokens a drafter proposes per round
    block_steps: int = 0  # with blocks (a block model's, or block_length): passes per block (0: spread steps)

    # Options that only a diffusion model uses (an AR model decodes one token per pass).
    DIFFUSION_ONLY = ("steps", "strategy", "schedule", "threshold", "block_length", "cache", "cache_refresh",
                      "remask", "alg_temp", "cfg_scale", "block_steps")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> SamplerOptions:
        """The options among a command's parsed flags (flags with other names are left out)."""
        return cls(**typed_fields(args, vars(args)))

    def block_paced(self, model_type: str) -> bool:
        """Whether block_steps sets the pace: it is on and there are blocks (a block model's, or block_length)."""
        return bool(self.block_steps) and (bool(self.block_length) or model_type == "block")

    def replace(self, **changes) -> SamplerOptions:
        """A copy with these fields changed (unknown names: TypeError)."""
        return dataclasses.replace(self, **changes)

    def check(self) -> SamplerOptions:
        """Self, if every option has its type and is in range; else a UserError naming the flag."""
        _check_types(self)
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.temp < 0:
            raise UserError(f"--temp must be >= 0, got {self.temp}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError("--top-k must be >= 0 and --top-p in (0, 1]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in [0, 2^64), got {self.seed}")
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if self.draft_length < 1:
            raise UserError(f"--draft-length must be at least 1, got {self.draft_length}")
        self._check_diffusion()
        return self

    def _check_diffusion(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise UserError(f"--threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.remask < 1.0:
            raise UserError(f"--remask must be in [0, 1), got {self.remask}")
        if self.remask and self.threshold is not None:
            raise UserError("--remask needs a step schedule: it cannot be combined with --threshold")
        if self.block_length < 0 or self.cache_refresh < 0:
            raise UserError("--block-length and --cache-refresh must be >= 0")
        if self.block_steps < 0:
            raise UserError(f"--block-steps must be >= 0, got {self.block_steps}")
        if self.alg_temp < 0 or self.cfg_scale < 0:
            raise UserError("--alg-temp and --cfg-scale must be >= 0")
        if self.cfg_scale and self.cache:
            raise UserError("--cfg-scale needs the whole canvas in both passes: it does not combine with --cache")
        if self.cache not in (None, False, True, *CACHE_MODES):
            raise UserError(f"--cache must be prefix or dual, got {self.cache!r}")
        if self.cache and not self.block_length:
            raise UserError("--cache needs --block-length (the cache holds the blocks before the current one)")

    @property
    def cache_mode(self) -> str | None:
        """"prefix", "dual" or None (True means the prefix cache, as before "dual" existed)."""
        return "prefix" if self.cache is True else (self.cache or None)


# Each field's accepted types (numpy scalars too; a bool is not a number here, and a float field takes ints).
_INT, _FLOAT = (numbers.Integral,), (numbers.Real,)
FIELD_TYPES = {"max_tokens": _INT, "steps": _INT, "strategy": (str,), "schedule": (str,), "temp": _FLOAT,
               "top_k": _INT, "top_p": _FLOAT, "seed": _INT, "num_samples": _INT, "suffix": (str,),
               "template": (str,), "threshold": _FLOAT, "block_length": _INT, "cache": (bool, str),
               "cache_refresh": _INT, "remask": _FLOAT, "alg_temp": _FLOAT, "cfg_scale": _FLOAT,
               "draft_length": _INT, "block_steps": _INT}
OPTIONAL = ("seed", "template", "threshold", "cache")  # may be None


def _check_types(options: SamplerOptions) -> None:
    for name, kinds in FIELD_TYPES.items():
        value = getattr(options, name)
        if value is None and name in OPTIONAL:
            continue
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise UserError(f"{flag} has the wrong type ({type(value).__name__})")
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")


# What a model directory's sampling.json may set: how the model decodes best, not what one call asks for (seed,
# samples, suffix, template).
MODEL_FIELDS = ("max_tokens", "steps", "block_steps", "threshold", "strategy", "schedule", "temp", "top_k", "top_p",
                "block_length", "cache", "cache_refresh", "remask", "alg_temp", "cfg_scale", "draft_length")
PACE = ("steps", "block_steps", "threshold")  # how many positions a pass commits: one choice
DEFAULTS_ATTRIBUTE = "sampling_defaults"  # where `io.load` keeps a model's sampling.json (a dict)


def own_defaults(model) -> dict:
    """What the model's sampling.json sets (field -> value; {} without one, or for a model not from `io.load`)."""
    return dict(vars(model).get(DEFAULTS_ATTRIBUTE, {}))


def model_defaults(model) -> SamplerOptions:
    """SamplerOptions' defaults, changed by the model's own (its directory's sampling.json, kept by `io.load`)."""
    return SamplerOptions(**own_defaults(model))


def typed_fields(args: argparse.Namespace, given: Collection[str]) -> dict:
    """The SamplerOptions fields among a command's parsed flags whose names are in given (e.g. those typed)."""
    return {f.name: vars(args)[f.name] for f in dataclasses.fields(SamplerOptions)
            if f.name in vars(args) and f.name in given}


def options_for(model, given: dict, drafter=None) -> SamplerOptions:
    """What a call runs with: the model's defaults under the caller's fields (field -> value), and with a drafter
    (speculative decoding) the drafter's own draft_length unless given."""
    return with_drafter(over_defaults(model_defaults(model), given), drafter, given)


def with_drafter(options: SamplerOptions, drafter, given: Collection[str]) -> SamplerOptions:
    """Speculative decoding: the drafter's own draft_length (its sampling.json: how many it drafts well) unless the
    caller gave one (given: the fields the caller set)."""
    own = own_defaults(drafter).get("draft_length") if drafter is not None else None
    return options if own is None or "draft_length" in given else options.replace(draft_length=own)


def over_defaults(defaults: SamplerOptions, given: dict) -> SamplerOptions:
    """The caller's options (field -> value) laid over a model's defaults. Giving any of PACE drops the defaults'
    others (back to SamplerOptions' own), so the caller's pace is the one that runs."""
    if set(given) & set(PACE):
        plain = SamplerOptions()
        defaults = defaults.replace(**{name: getattr(plain, name) for name in PACE})
    return defaults.replace(**given)
