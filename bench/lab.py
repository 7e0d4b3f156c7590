"""What bench/levers.py and bench/active_learning.py share: a round's training and measurement on cached
encoder features, the way ``workers.rounds.run.run_round`` does them (window examples from the corrections,
a validation split by video file, per-label thresholds tuned on it), without re-encoding a video per run.

The encoder is frozen, so one model's features serve every variant with the same backbone spec; a variant that
changes the spec (grid, pool, motion) gets its own base model and features.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Measured:
    map50: float
    per_label: dict[str, float]
    auc: dict[str, float | None]
    train_s: float
    thresholds: dict[str, float] = field(default_factory=dict)


class Lab:
    """Rounds on cached features. ``labels``: the event vocabulary (EventLabel list); ``windows``: the
    round's {"window_s", "stride_s"}; ``cuts``: each :meth:`train` also tunes the other threshold rules
    (``self.cuts``)."""

    def __init__(self, work: Path, labels, windows: dict, cuts: bool = False):
        from workers.schemas import PrelabelSettings

        self.work, self.labels = work, labels
        self.names = [label.name for label in labels]
        self.questions = [label.question() for label in labels]
        self.p = PrelabelSettings().resolved(windows)
        self._bases: dict[str, Path] = {}
        self._feats: dict[tuple[str, str], tuple] = {}
        self.want_cuts, self.cuts = cuts, {}

    def base(self, spec_changes: dict | None = None, config_changes: dict | None = None) -> Path:
        """A saved fresh builtin model with these spec and STLLMConfig changes (built once)."""
        from workers.stllm.backbones.composed import BUILTIN_SPEC
        from workers.stllm.io import build_model, save_model
        from workers.stllm.method import STLLMConfig

        spec = {**BUILTIN_SPEC, **(spec_changes or {})}
        key = json.dumps([spec, config_changes or {}], sort_keys=True)
        if key not in self._bases:
            path = self.work / ("base-" + hashlib.sha1(key.encode()).hexdigest()[:10])
            if not path.exists():
                model = build_model(spec, config=STLLMConfig(**(config_changes or {})), device="cpu")
                save_model(model, path, version="base")
            self._bases[key] = path
        return self._bases[key]

    def features(self, base: Path, video) -> tuple:
        """(decoded windows, encoder features) of one corrected video (a CorrectedVideo), cached per spec."""
        import torch

        from workers.jobs import decode_side, decode_windows, encode_video
        from workers.stllm.io import MODEL_FILE, load_model

        spec = json.loads((base / MODEL_FILE).read_text())["backbone"]
        key = (json.dumps({k: spec.get(k) for k in ("vision", "grid", "pool")}, sort_keys=True), video.video)
        if key not in self._feats:
            p = self.p
            name = (
                hashlib.sha1(  # the preprocessing's source too: features made before a change to it are stale
                    repr(
                        (key, p.window_s, p.stride_s, p.frames_per_window, p.global_frames, _preprocessing())
                    ).encode()
                )
            )
            cached = self.work / "features" / (name.hexdigest()[:16] + ".pt")
            if cached.exists():  # encoder features on disk: a later run skips decoding and encoding
                self._feats[key] = torch.load(cached, weights_only=False)
                return self._feats[key]
            if not hasattr(self, "_encoder") or self._encoder[0] != key[0]:
                self._encoder = (key[0], load_model(base, dtype="auto"))
            enc = self._encoder[1]
            d = decode_windows(
                video.video, p.window_s, p.stride_s, p.frames_per_window, p.global_frames, decode_side(enc)
            )
            self._feats[key] = (d, encode_video(enc, d))
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self._feats[key], cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)
        return self._feats[key]

    def probabilities(self, model, base: Path, videos) -> dict:
        """video_id -> PrelabelResult (windows and P(yes)) of ``model`` on corrected videos."""
        from workers.jobs import window_probabilities_many
        from workers.schemas import PrelabelResult, VideoMeta

        cached = [self.features(base, v) for v in videos]
        probs = window_probabilities_many(
            model, [c[0] for c in cached], self.questions, 32, [c[1] for c in cached]
        )
        out = {}
        for v, (d, _), pr in zip(videos, cached, probs, strict=True):
            meta = VideoMeta(fps=d.info.fps, n_frames=d.info.n_frames, duration=d.info.duration)
            out[v.video_id] = PrelabelResult(
                video=v.video,
                model_version="lab",
                meta=meta,
                windows=d.spans,
                window_probs={n: [float(x) for x in pr[:, j]] for j, n in enumerate(self.names)},
            )
        return out

    def train(
        self, snapshot, base: Path, train_changes: dict | None = None, seed: int = 0, with_path: bool = False
    ):
        """One round on ``snapshot`` from ``base`` (the base model, or an earlier round's saved model to train
        on): (trained model for inference, thresholds tuned on its validation and training videos, training
        seconds[, the saved model's directory with ``with_path``]). Split, examples, the retry of a run that
        learned nothing and the thresholds (on the validation videos and the training videos up to
        ``RoundSettings.tune_windows`` windows) as run_round makes them; ``self.cuts``: other threshold rules
        on the same scores."""
        import torch

        from workers.rounds.corrections import split_ids, video_key
        from workers.rounds.run import train_until_learned, tune_thresholds, window_examples
        from workers.schemas import RoundSettings, TrainSettings
        from workers.stllm.io import load_model, save_model
        from workers.stllm.train import Example, TrainOptions

        by_id = {v.video_id: v for v in snapshot.videos}
        ids = list(by_id)
        train_ids, val_ids = split_ids(ids, group=lambda i: video_key(by_id[i].video))
        settings = TrainSettings(seed=seed, **(train_changes or {}))
        s = RoundSettings(prelabel=self.p, train=settings)
        index = {i: k for k, i in enumerate(train_ids)}
        examples = [
            Example(index[v], w, q, a, t) for v, w, q, a, t in window_examples(snapshot, train_ids, s)
        ]
        feats = [self.features(base, by_id[i])[1] for i in train_ids]
        torch.manual_seed(seed)
        model = load_model(base, dtype="auto", trainable=True)
        t = time.perf_counter()
        ce: list[float] = []

        def progress(k: int, record: dict) -> None:
            ce.append(record["ce"])
            if k % 25 == 0:
                print(
                    f"      step {k}: {record}; mean CE of the last 25 steps {np.mean(ce[-25:]):.3f}",
                    flush=True,
                )

        model, _, attempts = train_until_learned(  # with a round's retry of a run that learned nothing
            model,
            lambda: load_model(base, dtype="auto", trainable=True),
            feats,
            examples,
            TrainOptions(**settings.model_dump()),
            RoundSettings().retries,
            progress=progress,
        )
        if len(attempts) > 1:
            print(f"      attempts: {attempts}", flush=True)
        train_s = time.perf_counter() - t
        out = self.model_dir(base, train_changes, len(snapshot.videos), seed)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, version="lab")
        model = load_model(out, dtype="auto")
        thresholds = {}
        self.cuts = {}
        if val_ids:
            scored, gt = self.tuning_scores(model, base, snapshot)
            thresholds = tune_thresholds(scored, gt, self.names, self.p)
            if self.want_cuts:
                self.cuts = {  # other threshold rules on the same scores (bench/levers.py --cuts)
                    "tuned": thresholds,
                    "smooth1": tune_thresholds(scored, gt, self.names, self.p, smooth=1),
                    "smooth2": tune_thresholds(scored, gt, self.names, self.p, smooth=2),
                    "at0.5": dict.fromkeys(self.names, 0.5),
                }
        return (model, thresholds, train_s, out) if with_path else (model, thresholds, train_s)

    def tuning_scores(self, model, base: Path, snapshot) -> tuple[dict, dict]:
        """(video id -> PrelabelResult, video id -> corrected segments) of the videos a round tunes its
        thresholds on, scored by ``model``: the validation split and the training videos up to
        ``RoundSettings.tune_windows`` windows, each with only the labels it was checked for."""
        from workers.rounds.corrections import split_ids, video_key
        from workers.rounds.run import checked_only, tuning_videos
        from workers.schemas import RoundSettings

        by_id = {v.video_id: v for v in snapshot.videos}
        train_ids, val_ids = split_ids(list(by_id), group=lambda i: video_key(by_id[i].video))
        counts = {i: len(self.features(base, by_id[i])[0].spans) for i in train_ids}
        tuning = tuning_videos(counts, RoundSettings().tune_windows)  # the training videos a round scores
        scored = self.probabilities(model, base, [by_id[i] for i in val_ids + tuning])
        scored = {i: checked_only(r, by_id[i]) for i, r in scored.items()}
        return scored, {i: list(by_id[i].segments) for i in scored}

    def model_dir(self, start: Path, train_changes: dict | None, n_videos: int, seed: int) -> Path:
        """Where :meth:`train` saves the model it trains from ``start`` on ``n_videos`` corrected videos."""
        changes = hashlib.sha1(repr(sorted((train_changes or {}).items())).encode()).hexdigest()[:6]
        return self.work / "models" / f"{start.name}-{changes}-{n_videos}-s{seed}"

    def measure(self, model, base: Path, heldout, thresholds: dict, train_s: float = 0.0) -> Measured:
        """Held-out mAP@0.5, per-label AP@0.5 and window ROC-AUC of ``model`` cut at ``thresholds``."""
        return self.measure_cuts(model, base, heldout, {"": thresholds}, train_s)[""]

    def measure_cuts(
        self, model, base: Path, heldout, cuts: dict[str, dict], train_s: float = 0.0
    ) -> dict[str, Measured]:
        """:meth:`measure` for each set of thresholds in ``cuts`` (name -> thresholds), scoring once."""
        from workers.jobs import result_segments
        from workers.rounds.evaluation import evaluate, window_auc

        res = self.probabilities(model, base, heldout.videos)
        gt = {v.video_id: list(v.segments) for v in heldout.videos}
        auc = window_auc(
            {i: [tuple(w) for w in r.windows] for i, r in res.items()},
            {i: r.window_probs for i, r in res.items()},
            gt,
            self.names,
        )
        out = {}
        for name, thresholds in cuts.items():
            q = self.p.model_copy(update={"thresholds": thresholds})
            rep = evaluate({i: result_segments(r, self.names, q) for i, r in res.items()}, gt)
            out[name] = Measured(rep.map_at(0.5), rep.per_label(0.5), auc, train_s, thresholds)
        return out


def _preprocessing() -> str:
    """A digest of the code that turns decoded frames into the encoder's input."""
    import inspect

    from workers.stllm import video

    return hashlib.sha1(inspect.getsource(video.preprocess_frames).encode()).hexdigest()[:12]


def mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):.3f} ± {sd:.3f}"
