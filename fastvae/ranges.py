"""Checks declared with an option: a number's range, an available device.

Each check is stated once where its option is declared. As argparse's ``type=`` it parses and checks
the text when the command line is parsed, so a bad value ends as a usage error naming the flag;
``check(value, name)`` is the same check for a value that comes from Python (TrainConfig.validate);
``describe()`` is what ``--help`` shows beside the default; ``violations()`` are texts the check
refuses, from which a test builds its bad command lines.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


class Check:
    """What every declared check provides: parse, problem, describe, violations."""

    def parse(self, text: str):
        """The value a command-line text stands for; argparse.ArgumentTypeError if it stands for none."""
        raise NotImplementedError

    def problem(self, value) -> str | None:
        """What is wrong with value (completing "NAME ..."), or None when it passes."""
        raise NotImplementedError

    def describe(self) -> str:
        """The allowed values, for --help."""
        raise NotImplementedError

    def violations(self) -> list[str]:
        """Command-line texts this check refuses."""
        raise NotImplementedError

    def __call__(self, text: str):
        value = self.parse(text)
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    def check(self, value, name: str) -> None:
        """Raise ValueError naming `name` if value does not pass."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{name} {problem}")


def _number(value: float) -> str:
    """1, 0.5, and large powers of two as 2^31 (the seed's bounds)."""
    if float(value).is_integer() and abs(value) >= 2**16 and (abs(int(value)) & (abs(int(value)) - 1)) == 0:
        return f"{'-' if value < 0 else ''}2^{abs(int(value)).bit_length() - 1}"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _text(value: float) -> str:
    """value as a command line writes it."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Range(Check):
    """A number within bounds: ge/gt a lower bound (inclusive/exclusive), le/lt an upper one;
    integer: whole numbers only; finite: no nan or infinity."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False
    finite: bool = False

    def __post_init__(self):
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise TypeError("Range takes one lower bound (ge or gt) and one upper bound (le or lt)")

    @property
    def _low(self):
        return (self.ge, True) if self.ge is not None else (self.gt, False)

    @property
    def _high(self):
        return (self.le, True) if self.le is not None else (self.lt, False)

    def bounds(self) -> str:
        """">= 1", "> 0", "in [0, 1)", "finite", "finite and > 0" (empty: any number)."""
        (low, low_in), (high, high_in) = self._low, self._high
        if low is not None and high is not None:
            return f"in {'[' if low_in else '('}{_number(low)}, {_number(high)}{']' if high_in else ')'}"
        parts = ["finite"] if self.finite and not self.integer else []
        if low is not None:
            parts.append(f"{'>=' if low_in else '>'} {_number(low)}")
        if high is not None:
            parts.append(f"{'<=' if high_in else '<'} {_number(high)}")
        return " and ".join(parts)

    def describe(self) -> str:
        if self.integer:
            return f"an integer {self.bounds()}".rstrip()
        if not self.finite or self._low[0] is not None and self._high[0] is not None:
            return f"a number {self.bounds()}".rstrip()
        return f"a finite number {self.bounds().removeprefix('finite').removeprefix(' and ')}".rstrip()

    def parse(self, text: str):
        try:
            return int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {'int' if self.integer else 'float'} value: {text!r}") \
                from None

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}, got {value!r}"
        if self.integer and not float(value).is_integer():
            return f"must be an integer, got {value}"
        (low, low_in), (high, high_in) = self._low, self._high
        inside = ((not self.finite or math.isfinite(value))
                  and (low is None or (value >= low if low_in else value > low))
                  and (high is None or (value <= high if high_in else value < high)))
        return None if inside else f"must be {self.bounds()}, got {value}"

    def violations(self) -> list[str]:
        (low, low_in), (high, high_in) = self._low, self._high
        step = 1 if self.integer else 0.5
        texts = []
        if low is not None:
            texts.append(_text(low - step) if low_in else _text(low))
        if high is not None:
            texts.append(_text(high + step) if high_in else _text(high))
        if self.integer:
            texts.append(f"{_text((low if low is not None else 0) + 1)}.5")
        elif self.finite or low is not None or high is not None:
            texts.append("nan")
        return texts


@dataclass(frozen=True)
class CommaSeparated(Check):
    """Comma-separated integers, each within `item` (e.g. --hidden 200,200); an empty text is no values."""

    item: Range

    def parse(self, text: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

    def problem(self, values) -> str | None:
        bad = [v for v in values if self.item.problem(v) is not None]
        return f"each value must be {self.item.bounds()}, got {bad[0]}" if bad else None

    def describe(self) -> str:
        return f"comma-separated integers {self.item.bounds()}"

    def violations(self) -> list[str]:
        return [f"1,{text}" for text in self.item.violations() if "." not in text and text != "nan"]


@dataclass(frozen=True)
class AvailableDevice(Check):
    """A torch device this process can use: cpu, or cuda[:INDEX] with a CUDA build and that GPU present.

    Parsed as text (TrainConfig keeps the device as a string); the check says what exists instead."""

    def parse(self, text: str) -> str:
        return text

    def problem(self, value) -> str | None:
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            return f"{value!r} is not a torch device; this machine has {', '.join(available_devices())}"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            reason = _cuda_problem(device.index)
        else:
            backend = getattr(torch, device.type, None)
            is_available = getattr(backend, "is_available", None)
            reason = None if callable(is_available) and is_available() else f"no {device.type} device here"
        if reason is None:
            return None
        return f"{value} is not available: {reason}; this machine has {', '.join(available_devices())}"

    def describe(self) -> str:
        return "cpu, or cuda[:INDEX] on a machine with that GPU"

    def violations(self) -> list[str]:
        import torch

        return ["nonsense-device", f"cuda:{torch.cuda.device_count()}"]


def _cuda_problem(index: int | None) -> str | None:
    import torch

    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    count = torch.cuda.device_count()
    if count == 0:
        return "no CUDA GPU is visible to this process"
    if not torch.cuda.is_available():
        return f"CUDA cannot use the {count} GPU(s) it sees (torch.cuda.is_available() is False: the driver?)"
    if index is not None and index >= count:
        return f"there {'is 1 GPU' if count == 1 else f'are {count} GPUs'}"
    return None


def available_devices() -> list[str]:
    """cpu and every CUDA GPU this process sees, as --device names them."""
    import torch

    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def declared_check(parse) -> Check | None:
    """The check behind an argparse type=: the check itself, or the check whose parse method it is."""
    owner = getattr(parse, "__self__", parse)
    return owner if isinstance(owner, Check) else None


# Every --seed: 32-bit signed integers, negative ones included (the training run derives its epochs'
# seeds from it by a multiplication that must stay inside torch's 64-bit seeds).
SEED = Range(ge=-2**31, lt=2**31, integer=True)
