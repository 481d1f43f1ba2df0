"""A terminal progress bar fed by :class:`~onnxprune.progress.Progress` events (embedded and remote runs)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from onnxprune.progress import Progress


class StageBar:
    """One tqdm bar over the whole job; the description shows the current stage. Silent when not a TTY.

    Events carry a fraction *within* their stage; the bar places it by the stage's position in the
    pipeline (``stages``), so sub-stages that report their own progress (calibrate, finetune) move it too.
    """

    def __init__(self, desc: str = "onnxprune", stages: list[str] | None = None) -> None:
        if stages is None:
            from onnxprune.pipeline import STAGES

            stages = [name for name, _ in STAGES]
        self._index = {name: k for k, name in enumerate(stages)}
        self._total = len(stages)
        self._bar = tqdm(total=100, desc=desc, unit="%", leave=False, disable=not sys.stderr.isatty(),
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def overall(self, event: Progress) -> float | None:
        """Share of the job done at ``event``, or None for events outside the pipeline's stages."""
        if event.stage == "done":
            return 1.0
        k = self._index.get(event.stage)
        return None if k is None else (k + event.fraction) / self._total

    def __call__(self, event: Progress) -> None:
        self._bar.set_postfix_str(event.message or event.stage, refresh=False)
        done = self.overall(event)
        if done is not None:
            self._bar.n = max(self._bar.n, int(round(100 * done)))
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
