"""Settings shared by every stage (optimizer, run) and YAML -> dataclass loading.

A stage config is a dataclass whose fields are plain values or nested dataclasses; its YAML file
mirrors it section by section. Unknown keys are errors (a typo must not silently train with a
default), and `key.sub=value` overrides from the command line are applied on top.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class OptimConfig:
    """AdamW + warmup + cosine decay (published: lr 2e-4, cosine, warmup ratio 0.01, no weight decay)."""

    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator term
    warmup_ratio: float = 0.01  # of the total steps, linear from 0
    scheduler: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # the schedule ends at lr x min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping (the gradient norm is still logged and checked)

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0 or self.max_grad_norm < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim: weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 = no clipping), eps "
                             f"> 0 and min_lr_ratio in [0, 1]; got weight_decay={self.weight_decay}, max_grad_norm="
                             f"{self.max_grad_norm}, eps={self.eps}, min_lr_ratio={self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.betas}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class RunConfig:
    """How a run executes. Effective batch = grad_accum x processes rows (published: 8 x 8 GPUs x 1 sample)."""

    output_dir: str = "runs/stage"  # checkpoints (step-N/, latest, final/) and metrics.jsonl
    epochs: float = 1.0  # passes over data.train (fractions allowed)
    max_steps: int | None = None  # cap on the total number of optimizer steps
    grad_accum: int = 8  # rows per optimizer step in each process
    # rows of a step run in one forward (concatenated, samples still apart by cu_seqlens): the same gradients
    # with half or fewer kernel launches, for a step whose kernels wait on the host; memory grows with it
    rows_per_forward: int = 1
    bf16: bool = True  # autocast to bfloat16 (trained weights and optimizer state stay float32)
    # with bf16: frozen weights whose values are bf16 (the released checkpoints) are stored in bfloat16, not as
    # float32 copies that autocast casts again in every forward and recompute; trained weights keep float32
    frozen_bf16: bool = True
    gradient_checkpointing: bool = True  # recompute decoder layers in backward to save memory
    # with gradient_checkpointing: decoder layers (the first N) that recompute their forward in backward; None
    # = all. The rest keep their activations: spare GPU memory spent on less recompute work
    # (benchmarks/results/README.md has the measured trade at the 4B shape)
    recompute_layers: int | None = None
    seed: int = 0  # data order, dropout, LoRA init
    save_every: int = 500  # steps; the last step is always saved
    keep_last: int = 2  # checkpoints kept (0: all)
    log_every: int = 10  # steps between metrics lines
    resume: bool = True  # continue from output_dir/latest when it exists
    stop_after: int | None = None  # end this invocation after that many steps (as if preempted)
    parallel: str = "auto"  # auto (fsdp on GPUs, ddp on CPU) | ddp | fsdp | none
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    backend: str = "auto"  # the student's decoder kernels: auto (fla on CUDA when installed) | torch | fla
    progress: bool = True  # progress bar on the first process

    def __post_init__(self):
        if self.output_dir:
            self.output_dir = str(Path(self.output_dir).expanduser())
        if not self.output_dir or Path(self.output_dir).is_file():
            raise ValueError(f"run.output_dir must be a folder (new, or one of this run's), got {self.output_dir!r}"
                             + (": that is a file" if self.output_dir else ""))
        if self.parallel not in ("auto", "ddp", "fsdp", "none"):
            raise ValueError(f"run.parallel must be auto, ddp, fsdp or none, got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"run.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.backend not in ("auto", "torch", "fla"):
            raise ValueError(f"run.backend must be auto, torch or fla, got {self.backend!r}")
        if self.rows_per_forward < 1:
            raise ValueError(f"run.rows_per_forward must be >= 1, got {self.rows_per_forward}")
        r = self.recompute_layers
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"run.recompute_layers must be a whole number >= 0, or null for all layers; got {r!r}")
        if self.epochs <= 0:
            raise ValueError(f"run.epochs must be > 0, got {self.epochs}")
        for name in ("grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last < 0:
            raise ValueError(f"run.keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        for name in ("max_steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, or null for no limit; got {getattr(self, name)}")


_NONE = type(None)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not _NONE)
    if dataclasses.is_dataclass(tp):
        return f"a section of keys ({', '.join(f.name for f in dataclasses.fields(tp))})"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(tp, value, where: str):
    """`value` (from YAML) as type `tp`, or a ValueError naming the key, what it must be and what it got."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is not _NONE:
                try:
                    return _convert(a, value, where)
                except ValueError:
                    pass
        null = " or null" if _NONE in typing.get_args(tp) else ""
        raise ConfigError(where, f"{where} must be {_describe(tp)}{null}, got {value!r}")
    if value is None:
        raise ConfigError(where, f"{where} must be {_describe(tp)}, got null: give a value, or remove the key for "
                                 "the default")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(where, f"{where} must be {_describe(tp)}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where=where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, dict)) and item in (Any, str):  # one path / one source where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"{where} must be a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if value in (0, 1) and not isinstance(value, float):  # --set run.bf16=1
            return bool(value)
        raise ConfigError(where, f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(where, f"{where} must be {_describe(tp)}, got {value!r}")
        try:
            finite = math.isfinite(number)
        except OverflowError:  # an integer too large for a float
            finite = tp is int and abs(number) < 2**63
        if not finite:
            raise ConfigError(where, f"{where} must be a finite number{' (below 2**63)' if tp is int else ''}, got "
                                     f"{str(value)[:40]}")
        if tp is int:
            if isinstance(number, float) and not number.is_integer():
                raise ConfigError(where, f"{where} must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(where, f"{where} must be a string, got {value!r}")
        return str(value)
    return value


class ConfigError(ValueError):
    """A config value that cannot be used; `key` is its dotted key ("" for the whole config)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def from_dict(cls: type[T], d: dict[str, Any], *, where: str = "") -> T:
    """`cls` from a mapping; `where` is the dotted key of the mapping (empty at the top), named in errors."""
    if not isinstance(d, dict):
        raise ConfigError(where, f"{where or 'the config'} must be a mapping of keys, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0],
                          f"unknown key(s) {unknown} in {where or 'the config'}: known keys are {sorted(names)}")
    values = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in d.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # the section's own checks (__post_init__): the key is this section
        raise ConfigError(where, str(e)) from None


def _blamed(e: ConfigError, overrides: list[str]) -> str | None:
    """The --set key that gave the value `e` is about: the same key, or one inside the section `e` names whose
    dotted name the message mentions (a section's own checks name their keys)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    for k in reversed(keys):  # the last override of a key wins
        if k == e.key or e.key.startswith(k + ".") or e.key.startswith(k + "["):
            return k
        inside = not e.key or k.startswith(e.key + ".")
        if inside and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", str(e)):
            return k
    return None


def _field_comments(cls) -> dict[str, str]:
    """Each field's comment in `cls`'s source: on its line, or the comment lines just above it."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "class ")):
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = []
    return out


def describe_keys(cls, default=None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default value, comment) for every leaf key of the config dataclass `cls`, sections expanded;
    `default` is an instance whose values are shown (a section's own default), else the fields' defaults."""
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if default is not None:
            value = getattr(default, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            rows += describe_keys(type(value), value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, comments.get(f.name, "")))
    return rows


def keys_help(cls) -> str:
    """The config keys of `cls` with their defaults and comments, for `--help`."""
    import json
    import textwrap

    out = []
    for key, value, comment in describe_keys(cls):
        out.append(f"  {key} = {json.dumps(value)}")  # YAML spelling: null, true, "text", [..]
        if comment:
            out += textwrap.wrap(comment, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """`cls` from a YAML file (or defaults) with `a.b=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like section.key=value")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else ""  # key= is the empty string (key=null is null)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {o}: the value is not valid YAML ({e})") from None
        _set_path(raw, k.strip(), value)
    try:
        return from_dict(cls, raw)
    except ValueError as e:
        # the override that set the value named in the message, else the file
        hit = _blamed(e, list(overrides)) if isinstance(e, ConfigError) else None
        source = f"--set {hit}" if hit else path
        raise ValueError(f"{source}: {e}" if source else str(e)) from None


def check_output_dir(output_dir: str | Path) -> None:
    """run.output_dir can be created and written, checked before a model loads (a ValueError naming the fix)."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # unique across processes and hosts
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"run.output_dir {out} cannot be written ({type(e).__name__}: {e.strerror or e}): give a "
                         "folder this user may create and write") from None
