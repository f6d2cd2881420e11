"""Scorers: judge finished CIFs with one number each, lower is better (e.g. predicted eV/atom).

A scorer takes a batch of CIF texts and returns, for each, a :class:`ScoreResult` holding either a
finite score or the reason it could not score that CIF. A scorer raises :class:`ScorerError` only
when the whole batch failed (a remote server is unreachable, a model is missing): per-CIF problems
are results, not exceptions, so one odd structure never ends a search.

Scorers are made by factories registered under a name with :func:`register_scorer`. A factory
takes keyword options (strings from the command line arrive converted by :func:`parse_options`);
:func:`make_scorer` passes the caller's defaults (``device``, ``seed``) only to factories that
declare them, and refuses unknown options by name. Built-in scorers are plugins
(``plugins/scorers``) registered through the ``infra.plugins`` entry points; :func:`make_scorer`
loads those on first use, so library callers need not.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crystallm_core.registry import Registry, RegistryError


class ScorerError(RuntimeError):
    """The scorer could not score a batch at all (as opposed to one CIF it could not score)."""


@dataclass(frozen=True)
class ScoreResult:
    """A finite ``score`` (lower is better) or the ``error`` saying why there is none."""

    score: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.score is None) == (self.error is None):
            raise ValueError("a score result holds exactly one of score and error")

    @property
    def ok(self) -> bool:
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score} if self.ok else {"error": self.error}


def failure(reason: str) -> ScoreResult:
    return ScoreResult(error=reason)


class Scorer:
    """Base class of scorers; subclasses implement :meth:`score` and, if they hold resources, :meth:`close`."""

    name = "scorer"

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        raise NotImplementedError

    def close(self) -> None:
        """Release sockets, processes or device memory; the scorer is not used afterwards."""

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ScorerFactory = Callable[..., Scorer]
SCORERS: Registry[ScorerFactory] = Registry("scorer")


def register_scorer(name: str, factory: ScorerFactory, *, source: str = "", replace: bool = False) -> ScorerFactory:
    """Make ``factory(**options)`` available as scorer ``name`` (built-ins and plugins call this)."""
    return SCORERS.register(name, factory, source=source, replace=replace)


def _load_installed_plugins() -> None:
    from crystallm_core.plugins import load_entry_points

    load_entry_points()


def make_scorer(name: str, options: dict[str, Any] | None = None, **defaults: Any) -> Scorer:
    """Build scorer ``name`` with the user's ``options``; ``defaults`` go only to factories that take them.

    Raises :class:`ScorerError` naming the scorer and the offending option.
    """
    _load_installed_plugins()
    try:
        factory = SCORERS.get(name)
    except RegistryError as exc:
        from crystallm_core.plugins import failures_for

        failed = "; ".join(f"{f.source} ({f.error})" for f in failures_for("scorer"))
        raise ScorerError(f"{exc}" + (f"; plugins that failed to load: {failed}" if failed else "")) from None
    options = dict(options or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass the options as given
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = sorted(n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    if params and not takes_any:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ScorerError(
                f"scorer {name!r} does not take option(s) {', '.join(unknown)} (--scorer-option); "
                f"it takes: {', '.join(accepted) or 'none'}"
            )
    for key, value in defaults.items():
        if key not in options and (takes_any or key in accepted):
            options[key] = value
    try:
        scorer = factory(**options)
    except ScorerError:
        raise
    except (TypeError, ValueError) as exc:
        raise ScorerError(f"scorer {name!r}: {exc}") from None
    except Exception as exc:  # plugin factories may fail in any way; the caller gets one kind of error
        raise ScorerError(f"scorer {name!r} could not be made: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(scorer, "score", None)):
        raise ScorerError(f"scorer factory {name!r} returned {type(scorer).__name__}, which has no score() method")
    return scorer


def score_checked(scorer: Scorer, cifs: Sequence[str]) -> list[ScoreResult]:
    """``scorer.score(cifs)`` with its contract enforced: one result per CIF, finite scores only.

    Plugins are third-party code; a wrong-length answer would silently attach scores to the wrong
    structures, so it is refused as a whole-batch error.
    """
    if not cifs:
        return []
    results = list(scorer.score(list(cifs)))
    if len(results) != len(cifs):
        raise ScorerError(
            f"scorer {getattr(scorer, 'name', '?')!r} returned {len(results)} results for {len(cifs)} CIFs"
        )
    out = []
    for r in results:
        if not isinstance(r, ScoreResult):
            raise ScorerError(f"scorer {getattr(scorer, 'name', '?')!r} returned {type(r).__name__}, not ScoreResult")
        if r.ok and not math.isfinite(r.score):
            r = failure(f"non-finite score {r.score}")
        out.append(r)
    return out


def parse_value(text: str) -> Any:
    """An option value from the command line: JSON scalars (``3``, ``0.5``, ``true``, ``null``), else the string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool, type(None))) else text


def parse_options(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` to a dict; a malformed or repeated item is a ValueError naming ``flag``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE with KEY a word, e.g. {flag} device=cuda")
        if key in out:
            raise ValueError(f"{flag} {key} is given twice")
        out[key] = parse_value(value)
    return out
