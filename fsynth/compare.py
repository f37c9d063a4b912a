"""The difference of two rows' per-seed test accuracies, with its standard errors (unpaired and paired by seed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    """a − b in points, with the standard error the claim "a beats b" is judged by.

    `se` is Welch's sqrt(s_a²/n_a + s_b²/n_b) over the two rows' seeds. `paired`/`paired_se` are the mean and
    sd/√n of the per-seed differences a_s − b_s over the seeds both rows ran: the same training seed gives both
    runs the same LoRA initialisation and the same loader order, so the noise they share cancels."""

    diff: float
    se: float | None  # None when a row has one seed
    paired: float | None  # None under 2 shared seeds
    paired_se: float | None
    n_paired: int
    same_seeds: bool = False  # both rows ran exactly the same seeds

    @property
    def judged(self) -> tuple[float, float] | None:
        """(difference, standard error) a verdict uses: paired when both rows ran the same seeds (at least 2), else
        unpaired; None when neither exists."""
        if self.same_seeds and self.paired is not None and self.paired_se is not None:
            return self.paired, self.paired_se
        return (self.diff, self.se) if self.se is not None else None

    def beats(self, k: float = 2.0) -> bool | None:
        """Whether a − b exceeds k standard errors (None: cannot tell, one seed each)."""
        judged = self.judged
        return None if judged is None else judged[0] > k * judged[1]

    def text(self) -> str:
        """'+0.23 ± 0.10 pp (paired over 5 seeds; unpaired ± 0.41)' and the like."""
        judged = self.judged
        if judged is None:
            return f"{self.diff:+.2f} pp (a row with one seed: no error)"
        if self.same_seeds and self.paired_se is not None:
            unpaired = f"; unpaired ± {self.se:.2f}" if self.se is not None else ""
            detail = f"paired over {self.n_paired} seeds{unpaired}"
        else:
            detail = "unpaired" + (f"; paired over the {self.n_paired} shared seeds {self.paired:+.2f} ± "
                                   f"{self.paired_se:.2f}" if self.paired_se is not None else "")
        return f"{judged[0]:+.2f} ± {judged[1]:.2f} pp ({detail})"


def difference(a: Mapping[str, float], b: Mapping[str, float]) -> Difference:
    """a − b for two rows given as {seed: test accuracy (points)}."""
    diff = statistics.fmean(a.values()) - statistics.fmean(b.values())
    se = math.sqrt(statistics.variance(a.values()) / len(a) + statistics.variance(b.values()) / len(b)) \
        if len(a) > 1 and len(b) > 1 else None
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return Difference(diff, se, None, None, len(shared))
    per_seed = [a[s] - b[s] for s in shared]
    return Difference(diff, se, statistics.fmean(per_seed), statistics.stdev(per_seed) / math.sqrt(len(shared)),
                      len(shared), same_seeds=set(a) == set(b))
