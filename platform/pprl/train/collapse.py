"""Collapse detection from per-epoch metrics.

The seed paper's advice is to restart a run that shows no facial structure after a while. Two signs are cheap to
watch: the discriminator's real/fake accuracies pinned at 0 or 1 (one side has stopped learning), and the
generator's identity loss not falling while it is still high (decoded faces do not follow the target code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class CollapseDetector:
    patience: int  # epochs a sign must persist
    num_identities: int
    pinned: float = 0.99  # accuracy at or beyond which (or 1 - which) D counts as pinned
    min_improvement: float = 0.02  # relative fall of g_id that counts as progress
    solved_fraction: float = 0.25  # g_id below this fraction of log(N_id) means identity transfer already works

    def check(self, history: list[dict]) -> str:
        """'' when healthy, else the reason (also what the trainer logs)."""
        if self.patience <= 0 or len(history) < self.patience:
            return ""
        recent = history[-self.patience :]
        if all(self._is_pinned(m.get("d_real_acc"), m.get("d_fake_acc")) for m in recent):
            last = recent[-1]
            return (
                f"discriminator real/fake accuracy pinned for {self.patience} epochs "
                f"(real {last['d_real_acc']:.3f}, fake {last['d_fake_acc']:.3f}): consider restarting with another seed"
            )
        earlier = [m["g_id"] for m in history[: -self.patience] if "g_id" in m]
        current = [m["g_id"] for m in recent if "g_id" in m]
        if earlier and current:
            best = min(earlier)
            stalled = min(current) > best * (1 - self.min_improvement)
            if stalled and current[-1] > self.solved_fraction * math.log(self.num_identities):
                return (
                    f"generator identity loss has not fallen for {self.patience} epochs (g_id {current[-1]:.3f}, "
                    f"best earlier {best:.3f}): decoded faces do not follow the target code"
                )
        return ""

    def _is_pinned(self, real: float | None, fake: float | None) -> bool:
        if real is None or fake is None:
            return False

        def at_edge(a: float) -> bool:
            return a >= self.pinned or a <= 1 - self.pinned

        return at_edge(real) and at_edge(fake)
