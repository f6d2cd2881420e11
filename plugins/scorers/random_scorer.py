"""The ``random`` scorer: a score per CIF drawn from a hash of the seed and the text.

It stands in for an expensive predictor in tests and benchmarks: the same CIF always gets the same
score under the same seed, whichever batch it arrives in and whichever process scores it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from crystallm_core.scorers import Scorer, ScoreResult, failure, register_scorer


class RandomScorer(Scorer):
    name = "random"

    def __init__(
        self, seed: int = 0, low: float = -10.0, high: float = 0.0, fail_rate: float = 0.0, delay: float = 0.0
    ) -> None:
        if not high > low:
            raise ValueError(f"option high ({high}) must be greater than low ({low})")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"option fail_rate must be in [0, 1], got {fail_rate}")
        if delay < 0:
            raise ValueError(f"option delay must be >= 0 seconds, got {delay}")
        self.seed, self.low, self.high, self.fail_rate, self.delay = int(seed), low, high, fail_rate, delay

    def _uniform(self, text: str, salt: str) -> float:
        digest = hashlib.sha256(f"{self.seed}\0{salt}\0{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        if self.delay:
            time.sleep(self.delay)  # simulates a slow predictor (time-out tests, benchmarks)
        out = []
        for text in cifs:
            if self.fail_rate and self._uniform(text, "fail") < self.fail_rate:
                out.append(failure("random failure (fail_rate)"))
            else:
                out.append(ScoreResult(score=self.low + (self.high - self.low) * self._uniform(text, "score")))
        return out


register_scorer("random", RandomScorer)
