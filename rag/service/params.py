"""Request parameters declared once: each says what it accepts (a JSON-schema fragment for
the OpenAPI document) and reads a parsed JSON value against exactly that, so the document
and the server cannot disagree.  The generation settings a request may give, shared by
`/rag` and the OpenAI-compatible routes, and how they resolve against the server's
configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from rag.config import ModelConfig
from rag.service.questions import Decoding
from rag.service.validation import QueryRejected
from rag.web import excerpt

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as OpenAI's `seed`


class Invalid(QueryRejected):
    """A parameter's value is not what it accepts; the message names the parameter."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param} {problem}")
        self.param = param


class Param(Protocol):
    def schema(self) -> dict[str, Any]: ...

    def read(self, name: str, value: Any) -> Any: ...


def _types(kind: str, nullable: bool) -> str | list[str]:
    return [kind, "null"] if nullable else kind


@dataclass(frozen=True)
class Integer:
    low: int
    high: int
    description: str = ""
    nullable: bool = True

    def schema(self) -> dict[str, Any]:
        return {"type": _types("integer", self.nullable), "minimum": self.low,
                "maximum": self.high, "description": self.description}  # fmt: skip

    def read(self, name: str, value: Any) -> int | None:
        if value is None and self.nullable:
            return None
        if isinstance(value, float) and value.is_integer():  # JSON has one number type
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(name, f"must be an integer, not {excerpt(value)}")
        if not self.low <= value <= self.high:
            raise Invalid(name, f"must be between {self.low} and {self.high}, not {value}")
        return value


@dataclass(frozen=True)
class Number:
    low: float
    high: float
    description: str = ""
    low_excluded: bool = False

    def schema(self) -> dict[str, Any]:
        bound = "exclusiveMinimum" if self.low_excluded else "minimum"
        return {"type": ["number", "null"], bound: self.low, "maximum": self.high,
                "description": self.description}  # fmt: skip

    def read(self, name: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(name, f"must be a number, not {excerpt(value)}")
        low_ok = value > self.low if self.low_excluded else value >= self.low
        if not (low_ok and value <= self.high):
            side = "above" if self.low_excluded else "at least"
            raise Invalid(name, f"must be {side} {self.low:g} and at most {self.high:g}")
        return float(value)


@dataclass(frozen=True)
class Boolean:
    description: str = ""

    def schema(self) -> dict[str, Any]:
        return {"type": ["boolean", "null"], "description": self.description}

    def read(self, name: str, value: Any) -> bool | None:
        if value is not None and not isinstance(value, bool):
            raise Invalid(name, f"must be true or false, not {excerpt(value)}")
        return value


@dataclass(frozen=True)
class Only:
    """A setting that may be given only at the one value this server honours."""

    allowed: tuple[Any, ...]
    description: str = ""

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.allowed), "description": self.description}

    def read(self, name: str, value: Any) -> Any:
        if value is None and None in self.allowed:
            return None
        if not any(value == a and type(value) is type(a) for a in self.allowed):
            shown = " or ".join(excerpt(a) for a in self.allowed if a is not None)
            raise Invalid(name, f"is not supported here other than {shown or 'null'}")
        return value


def generation_params(max_tokens: int) -> dict[str, Param]:
    """What a request may say about its generation."""
    return {
        "stream": Boolean("Answer as Server-Sent Events, text as it is generated."),
        "max_tokens": Integer(1, max_tokens, "New tokens at most (default: the server's)."),
        "temperature": Number(0, 2, "0: greedy (the server's default unless configured)."),
        "top_p": Number(0, 1, "Nucleus sampling's probability mass.", low_excluded=True),
        "seed": Integer(*SEED_RANGE, "Sampling draws from a generator of this seed."),
        "ignore_eos": Boolean("Generate exactly max_tokens tokens (EOS is never chosen)."),
    }


def read_params(body: dict[str, Any], params: dict[str, Param]) -> dict[str, Any]:
    """Each declared parameter's value (None when absent); Invalid on the first bad one."""
    return {name: param.read(name, body.get(name)) for name, param in params.items()}


def decoding_of(values: dict[str, Any], cfg: ModelConfig, limit: int) -> Decoding:
    """A request's generation settings, the server's where it gives none."""
    max_tokens = values.get("max_tokens") or min(cfg.max_new_tokens, limit)
    ignore_eos = values.get("ignore_eos")
    temperature, top_p = values.get("temperature"), values.get("top_p")
    return Decoding(
        max_tokens,
        max_tokens if (cfg.ignore_eos if ignore_eos is None else ignore_eos) else 0,
        cfg.temperature if temperature is None else temperature,
        cfg.top_p if top_p is None else top_p,
        values.get("seed"),
    )
