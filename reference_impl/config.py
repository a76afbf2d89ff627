"""What a server is asked to be: which patterns are naive, where its data is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reference_impl.errors import UsageError

#: The six fixes of the original, each a pattern with a naive and an
#: optimized form.
PATTERNS = ("client", "listing", "images", "upload", "encoding", "body-limit")

#: A pattern may have further forms beyond the original's "after"; a server
#: picks one with ``--plus``.
PLUS_PATTERNS = ("encoding",)

DEFAULT_AI_URL = "http://127.0.0.1:8090/v1"


def parse_patterns(text: str | None) -> frozenset[str]:
    """``"client,upload"`` -> ``{"client", "upload"}``, rejecting unknown names."""
    if not text:
        return frozenset()
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(PATTERNS))
    if unknown:
        raise UsageError(
            f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(PATTERNS)}"
        )
    return frozenset(names)


@dataclass(frozen=True)
class Settings:
    """Everything an app instance needs; two instances never share state."""

    db_url: str
    storage_dir: Path
    naive: frozenset[str] = frozenset()
    plus: frozenset[str] = frozenset()
    ai_url: str = DEFAULT_AI_URL
    ai_timeout_s: float = 30.0
    #: Database pool sizing: ``sqlalchemy``, ``prisma`` or a number.
    pool_size: str = "sqlalchemy"
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def for_variant(
        cls,
        variant: str,
        *,
        naive: frozenset[str] = frozenset(),
        **kwargs: object,
    ) -> Settings:
        """``naive`` makes every pattern naive; ``optimized`` only those named."""
        if variant == "naive":
            chosen = frozenset(PATTERNS)
            plus: frozenset[str] = frozenset()
        elif variant == "optimized":
            chosen = frozenset(naive)
            plus = frozenset()
        elif variant == "optimized-plus":
            chosen = frozenset(naive)
            plus = frozenset(PLUS_PATTERNS) - chosen
        else:
            raise UsageError(
                f"unknown variant {variant!r}; known: naive, optimized, optimized-plus"
            )
        return cls(naive=chosen, plus=plus, **kwargs)  # type: ignore[arg-type]

    def is_naive(self, pattern: str) -> bool:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}")
        return pattern in self.naive

    def is_plus(self, pattern: str) -> bool:
        return pattern in self.plus

    @property
    def variant(self) -> str:
        if self.naive == frozenset(PATTERNS):
            return "naive"
        if self.plus:
            return "optimized-plus"
        return "optimized"
