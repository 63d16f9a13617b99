"""Request fields as every adapter reads them, from JSON, MessagePack or a form: one reader and one set of rules
(unknown fields, missing and null values, types, ranges, text length), so that every API answers the same
mistake with the same kind of 400 naming the field."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

from starlette.datastructures import FormData

from cosyapp.audio import SAMPLE_RATES
from cosyapp.server.errors import QUOTE_CHARS, ApiError, quote

MISSING = object()
TOO_LONG = "{name} is too long: {length} characters, the limit is {limit}"
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# Longest number sent as text that is parsed (int() of thousands of digits is slow, then refused).
NUMBER_CHARS = 64


def _finite(value: float) -> bool:
    """Whether `value` is a finite number a float holds (a huge integer is not: float() would overflow)."""
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= 2**63


def _field_name(name: Any) -> str:
    """A field's name as a message names it: as sent when it is a short string, else quoted (cut short)."""
    return name if isinstance(name, str) and len(name) <= QUOTE_CHARS and name.isprintable() else quote(name)


def check_length(text: str, limit: int, name: str, message: str = TOO_LONG) -> str:
    """The text-length rule: at most `limit` characters (0: no limit). `message` is the API's wording, formatted
    with name, length and limit."""
    if limit > 0 and len(text) > limit:
        raise ApiError(400, message.format(name=name, length=len(text), limit=limit))
    return text


def form_values(form: FormData) -> dict[str, Any]:
    """A form's fields by name; a field sent more than once is a 400 (which value was meant is unknown)."""
    for name in form.keys():
        count = len(form.getlist(name))
        if count > 1:
            raise ApiError(400, f"field {quote(name)} was given {count} times")
    return dict(form)


class Fields:
    """A request's fields read one by one; every problem is a 400 naming the field. Unknown fields are refused (a
    typo must not silently fall back to a default). `strings`: numbers and flags may come as text (forms, and
    APIs whose clients send either)."""

    def __init__(self, values: Any, accepted: Iterable[str], strings: bool = False) -> None:
        accepted = tuple(accepted)
        if not isinstance(values, dict):
            raise ApiError(400, "the request body must be an object (a map) of fields")
        unknown = sorted(_field_name(name) for name in values if name not in accepted)
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
                                f"accepted: {', '.join(accepted)}")
        self.values = values
        self.strings = strings

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str, default: Any = MISSING, nullable: bool = False) -> Any:
        if name not in self.values:
            if default is MISSING:
                raise ApiError(400, f"missing required field {name!r}")
            return default
        value = self.values[name]
        if value is None and not nullable:
            raise ApiError(400, f"{name} must not be null")
        return value

    def string(self, name: str, default: Any = MISSING, nullable: bool = False) -> str | None:
        """The value as sent (not stripped)."""
        value = self.get(name, default, nullable)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string; got {type(value).__name__}")
        return value

    def text(self, name: str, required: bool = False, limit: int = 0) -> str | None:
        """Stripped text, None when absent, null or blank (a 400 when `required`), at most `limit` characters."""
        value = self.string(name, None, nullable=True)
        value = value.strip() if value is not None else ""
        if not value:
            if required:
                raise ApiError(400, f"{name} is missing or empty")
            return None
        return check_length(value, limit, name)

    def integer(self, name: str, default: Any, low: int | None = None, high: int | None = None,
                nullable: bool = False) -> int | None:
        value = self._parsed(name, default, nullable, int)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"{name} must be a whole number; got {quote(value)}")
        return self._in_range(name, value, low, high)

    def number(self, name: str, default: Any, low: float | None = None, high: float | None = None) -> float | None:
        value = self._parsed(name, default, default is None, float)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ApiError(400, f"{name} must be a number; got {quote(value)}")
        return float(self._in_range(name, value, low, high))

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if self.strings and isinstance(value, str) and value.strip().lower() in (*TRUE, *FALSE):
            return value.strip().lower() in TRUE
        if not isinstance(value, bool):
            raise ApiError(400, f"{name} must be true or false; got {quote(value)}")
        return value

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        value = self.get(name, default)
        if not isinstance(value, str) or value not in choices:
            raise ApiError(400, f"{name} must be one of {', '.join(choices)}; got {quote(value)}")
        return value

    def _parsed(self, name: str, default: Any, nullable: bool, parse: Callable[[str], Any]) -> Any:
        """The value, parsed from text where text is allowed (a value that does not parse is left as it is)."""
        value = self.get(name, default, nullable)
        if self.strings and isinstance(value, str) and len(value) <= NUMBER_CHARS:
            with contextlib.suppress(ValueError):
                return parse(value)
        return value

    @staticmethod
    def _in_range(name: str, value: float, low: float | None, high: float | None) -> Any:
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low:g} to {high:g}" if low is not None and high is not None else \
                f"at least {low:g}" if low is not None else f"at most {high:g}"
            raise ApiError(400, f"{name} must be {bounds}; got {quote(value)}")
        return value


def sample_rate(fields: Fields, name: str = "sample_rate") -> int | None:
    """The output sample rate a request asks for (None when absent or null: the model's own rate); a 400 unless
    it is one of SAMPLE_RATES. The speech service resamples the audio to it while it streams."""
    value = fields.integer(name, None, nullable=True)
    if value is not None and value not in SAMPLE_RATES:
        raise ApiError(400, f"{name} must be one of {', '.join(map(str, SAMPLE_RATES))} (Hz); got {value}")
    return value


def seed(fields: Fields, name: str = "seed") -> int | None:
    """The request's random seed (the same request with the same seed gives the same audio); None: a fresh draw."""
    value = fields.integer(name, None, nullable=True)
    if value is not None and not 0 <= value < 2**63:
        raise ApiError(400, f"{name} must be a whole number from 0 to 2**63 - 1; got {value}")
    return value
