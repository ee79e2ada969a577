"""Shadow monitoring: the teacher re-scores a sample of live requests, off the request path, and the student's
top-1 agreement with it is tracked over a sliding window of examples.

A request is sampled with probability `rate`; its inputs and the student's answers go into a bounded queue (full:
the request is dropped from shadowing and counted, never waited on). One worker thread runs the teacher. When the
window holds at least `min_samples` examples and its agreement is below `threshold`, the monitor logs an alert
(once per fall) and, while it stays below, writes the disagreeing inputs of the window to
`out_dir/<time>-<n>.npz` (arrays x, y = the teacher's class ids, student = the student's, class_names), ready to
be added to the training data for another round of distillation (`load_disagreements`).
"""

from __future__ import annotations

import io
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kdkit.atomic import write_bytes
from kdkit.data.extra import load_npz_examples

logger = logging.getLogger("kdkit.serve")

TeacherFn = Callable[[np.ndarray], np.ndarray]  # inputs (B, *in_shape) float32 -> logits (B, C)


class ShadowMonitor:
    def __init__(
        self,
        teacher: TeacherFn,
        *,
        rate: float,
        window: int = 200,
        threshold: float = 0.9,
        out_dir: str | Path | None = None,
        class_names: list[str] | None = None,
        min_samples: int | None = None,
        queue_size: int = 64,
        max_files: int = 1000,
        seed: int | None = None,
        log: Callable[[str], None] = logger.info,
        alert: Callable[[str], None] = logger.warning,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate {rate}; expected a fraction in [0, 1]")
        if window < 1:
            raise ValueError(f"shadow window {window}; expected at least 1 example")
        self.teacher = teacher
        self.rate = float(rate)
        self.window = int(window)
        self.threshold = float(threshold)
        self.min_samples = int(min_samples if min_samples is not None else min(self.window, 20))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.class_names = list(class_names or [])
        self.max_files = max_files
        self.log, self.alert = log, alert
        self._rng = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._recent: deque[bool] = deque()  # True where teacher and student agreed, newest last
        self._agreed = 0
        self._pending: deque[tuple[int, np.ndarray, int, int]] = deque()  # (example number, x, student, teacher)
        self._below = False
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(
            ("scored_examples", "disagreements", "dropped_requests", "alerts", "written_examples", "failures", "files"),
            0,
        )

    # -- request path -------------------------------------------------------------------------------------------

    def offer(self, x: np.ndarray, student_ids: np.ndarray) -> bool:
        """Called after the student answered: sample this request with probability `rate` and queue it for the
        teacher without waiting. Returns whether it was queued."""
        if self.rate <= 0.0 or (self.rate < 1.0 and self._rng.random() >= self.rate):
            return False
        try:
            self._queue.put_nowait((x, np.asarray(student_ids)))
            return True
        except queue.Full:
            with self._lock:
                self.counts["dropped_requests"] += 1
            return False

    # -- worker -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="kdkit-shadow", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued (up to `timeout` seconds) and end the worker."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued has been scored (tests, shutdown). Returns False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.score(*item)
            except Exception:  # a failing teacher must not end monitoring; the request path never sees it
                with self._lock:
                    self.counts["failures"] += 1
                logger.exception("shadow: the teacher failed on a batch")
            finally:
                self._queue.task_done()

    def score(self, x: np.ndarray, student_ids: np.ndarray) -> None:
        """Run the teacher on x, update the window, alert and write disagreements. Runs on the worker thread."""
        teacher_ids = np.asarray(self.teacher(x)).argmax(-1)
        student_ids = np.asarray(student_ids).reshape(-1)
        agree = teacher_ids == student_ids
        with self._lock:
            for i, ok in enumerate(agree):
                n = self.counts["scored_examples"]
                self.counts["scored_examples"] += 1
                self._recent.append(bool(ok))
                self._agreed += bool(ok)
                if len(self._recent) > self.window:
                    self._agreed -= self._recent.popleft()
                if not ok:
                    self.counts["disagreements"] += 1
                    self._pending.append((n, x[i], int(student_ids[i]), int(teacher_ids[i])))
            scored = self.counts["scored_examples"]
            if scored // self.window != (scored - len(agree)) // self.window:  # once per `window` examples
                self.log(
                    f"shadow: agreement {self._agreed / len(self._recent):.3f} over the last {len(self._recent)} "
                    f"examples ({scored} scored, {self.counts['dropped_requests']} requests dropped)"
                )
            oldest = self.counts["scored_examples"] - self.window
            while self._pending and self._pending[0][0] < oldest:  # keep only disagreements still in the window
                self._pending.popleft()
            rate = self._agreed / len(self._recent)
            below = len(self._recent) >= self.min_samples and rate < self.threshold
            fell = below and not self._below
            self._below = below
            if fell:
                self.counts["alerts"] += 1
            batch = list(self._pending) if below else []
            if below:
                self._pending.clear()
        if fell:
            where = f"; writing disagreeing inputs to {self.out_dir}" if self.out_dir is not None else ""
            self.alert(
                f"shadow ALERT: student/teacher agreement {rate:.3f} over the last {len(self._recent)} examples is "
                f"below the threshold {self.threshold:g}{where}"
            )
        if batch:
            self._write(batch)

    def _write(self, batch: list[tuple[int, np.ndarray, int, int]]) -> None:
        if self.out_dir is None:
            return
        if self.counts["files"] >= self.max_files:
            if self.counts["files"] == self.max_files:
                self.alert(f"shadow: {self.max_files} disagreement files written; writing no more until a restart")
                self.counts["files"] += 1
            return
        buf = io.BytesIO()
        np.savez(
            buf,
            x=np.stack([b[1] for b in batch]).astype(np.float32),
            y=np.array([b[3] for b in batch], dtype=np.int64),
            student=np.array([b[2] for b in batch], dtype=np.int64),
            class_names=np.array(self.class_names, dtype=str),
        )
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        write_bytes(self.out_dir / f"{stamp}-{self.counts['files']:06d}.npz", buf.getvalue())
        with self._lock:
            self.counts["files"] += 1
            self.counts["written_examples"] += len(batch)

    # -- reading --------------------------------------------------------------------------------------------------

    @property
    def agreement(self) -> float | None:
        with self._lock:
            return self._agreed / len(self._recent) if self._recent else None

    def stats(self) -> dict:
        with self._lock:
            return {
                "agreement": self._agreed / len(self._recent) if self._recent else None,
                "window_examples": len(self._recent),
                "rate": self.rate,
                "threshold": self.threshold,
                "below_threshold": self._below,
                **{k: v for k, v in self.counts.items() if k != "files"},
            }


def load_disagreements(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All disagreeing inputs written under `folder`: (x (N, *in_shape) float32, y (N,) the teacher's class ids),
    oldest first; empty arrays when there are none. `kdkit train` takes the folder as data.extra_train."""
    x, y, _ = load_npz_examples(folder, where="shadow folder")
    return x, y
