"""Fine-tune rounds: a snapshot of corrections in, a LoRA adapter out, promoted only if it measures better.

    collect   the new corrections on top of every earlier round's (the store keeps each snapshot), frozen
              and saved in the model store
    windows   window length and stride chosen from the corrected events' durations (unless set; the
              serving version's when they are within 1.5x of it), recorded in the version: pre-labeling
              with it uses them by default
    split     train / validation by a hash of each video id (stable across rounds)
    train     window-level yes/no examples from overlap with the corrected segments (a window at an event's
              edge trains toward the share it covers), windows drawn
              label-balanced, each answering every label's question in one sequence; the served
              version's LoRA + projector + global-local MLP + MVM head trained on (fresh ones on the base
              model with ``train_from="base"``), masking + MVM on by default, seeded, resumable; a run that
              learned nothing (answer cross-entropy over its last quarter no better than answering each
              label's base rate, :func:`diverged`) starts again once
              at another seed and half the learning rate (``retries``)
    thresholds each label's P(yes) threshold, chosen on the validation and training videos
    gate      candidate vs serving version on the validation split (workers.rounds.gate): a bootstrap
              interval of the fall in window error (or of the rise in window ROC-AUC, ``gate_on="ranking"``,
              or of the mAP@0.5 gain, ``gate_on="map"``), and no label clearly lost; or forced
    serve     the registry records the version either way; workers pick up a promoted one on their next task

A round that fails anywhere leaves the registry and the served version as they were.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from workers.events import covered_share, windows
from workers.jobs import decode_side, decode_windows, encode_video, prelabel_videos, result_segments
from workers.media import is_remote
from workers.review import next_batch
from workers.rounds.corrections import (
    accumulate,
    choose_windows,
    load_snapshot,
    save_snapshot,
    split_ids,
    unit_hash,
    video_key,
)
from workers.rounds.evaluation import evaluate
from workers.rounds.gate import (
    bootstrap_auc_gain,
    bootstrap_gain,
    bootstrap_window_gain,
    decide,
    window_error,
    window_error_terms,
    window_ranking_parts,
)
from workers.rounds.registry import ModelStore, RegistryError
from workers.schemas import (
    CorrectedVideo,
    FiftyOneCorrections,
    PrelabelResult,
    PrelabelSettings,
    RoundRequest,
    RoundSettings,
    Segment,
    Snapshot,
    SnapshotCorrections,
)
from workers.stllm.train import Example, TrainOptions, train

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    version: str
    promoted: bool
    serving_before: str
    metrics: dict
    timings: dict
    reason: str
    next_batch: list[dict] = field(default_factory=list)


def suggest_next(
    model,
    snapshot: Snapshot,
    candidates: list[str],
    settings: RoundSettings,
    prelabel: PrelabelSettings,
) -> list[dict]:
    """The ``settings.next_batch`` candidate videos most worth correcting next, by ``model``'s uncertainty
    (workers.review.next_batch: labels take turns). A video already in ``snapshot`` is never suggested; at most
    ``settings.next_pool`` candidates are pre-labeled (a seeded random draw); unreadable ones are left out."""
    import random

    done = {v.video for v in snapshot.videos} | {
        os.path.realpath(v.video) for v in snapshot.videos if not is_remote(v.video)
    }
    pool = sorted({c for c in candidates if c not in done and os.path.realpath(c) not in done})
    if len(pool) > settings.next_pool:
        pool = sorted(random.Random(settings.train.seed).sample(pool, settings.next_pool))
    if not pool or not settings.next_batch:
        return []
    results = prelabel_videos(model, pool, snapshot.labels, prelabel)
    per = {r.video: r.label_uncertainty for r in results if r.error is None}
    return next_batch(per, settings.next_batch)


def init_store(store: ModelStore, base: str = "builtin") -> Path:
    """Create a model store whose base version is ``base``: a fresh model by name or spec, or a saved model
    directory (e.g. a converted ST-LLM release), saved so every worker serves the identical base."""
    from workers.stllm.io import build_model, is_model_dir, load_model, save_model

    if store.exists():
        raise RegistryError(f"model store {store.root} already exists")
    path = store.root / "versions" / "base"
    fresh = not isinstance(base, str) or not is_model_dir(base)
    save_model(
        build_model(base, device="cpu") if fresh else load_model(base, device="cpu", trainable=True),
        path,
        version="base",
    )
    store.init(base, path)
    return path


def window_examples(
    snapshot: Snapshot, video_ids: list[str], settings: RoundSettings
) -> list[tuple[str, int, str, str, float | None]]:
    """(video_id, window, question, yes/no, target) for the windows of ``settings.prelabel`` (concrete: see
    :meth:`PrelabelSettings.resolved`) and each label they were checked for. A window the label's events cover
    for at least ``yes_overlap`` is a yes (target None: 1), one they cover for at most ``no_overlap`` a no
    (None: 0). With ``train.soft_targets`` (and ``all_questions``) a window in between is a no whose target is
    the share they cover: it trains toward that P(yes), which keeps an event's edges below the yes windows
    instead of leaving them to drift; without, it is left out. (Every window toward its share, the yes ones
    too, drowned the short events of the second event set: a 1.1 s event's best window is a 0.55.)"""
    p = settings.prelabel.resolved()
    soft = settings.train.soft_targets and settings.train.all_questions
    out = []
    by_id = {v.video_id: v for v in snapshot.videos}
    for vid in video_ids:
        v = by_id[vid]
        segs = v.segments
        for w, (s, e) in enumerate(windows(v.duration, p.window_s, p.stride_s)):
            for label in snapshot.labels:
                if not v.checked_for(label.name):
                    continue
                share = covered_share([x for x in segs if x.label == label.name], s, e)
                if share >= settings.yes_overlap:
                    out.append((vid, w, label.question(), "yes", None))
                elif share <= settings.no_overlap:
                    out.append((vid, w, label.question(), "no", None))
                elif soft:
                    out.append((vid, w, label.question(), "no", share))
    return out


def _predict(
    model, snapshot: Snapshot, video_ids: list[str], prelabel: PrelabelSettings, failed: dict[str, str]
) -> dict[str, PrelabelResult]:
    """Each readable validation video's pre-labels (segments only for the labels it was checked for), by
    video id; a video that cannot be read goes into ``failed`` (id -> reason) instead."""
    by_id = {v.video_id: v for v in snapshot.videos}
    results = prelabel_videos(model, [by_id[i].video for i in video_ids], snapshot.labels, prelabel)
    out = {}
    for i, r in zip(video_ids, results, strict=True):
        if r.error:
            failed[i] = f"{by_id[i].video}: {r.error}"
            continue
        r.segments = [x for x in r.segments if by_id[i].checked_for(x.label)]
        out[i] = r
    return out


CHANCE_CE = math.log(2)  # cross-entropy of a 50/50 answer to a yes/no question


def _tail(history: list[dict]) -> list[dict]:
    """A run's last quarter of steps (at least 2): what judges how it ended."""
    return history[-max(2, len(history) // 4) :]


def _tail_ce(history: list[dict]) -> float:
    """The mean answer cross-entropy over a run's last quarter of steps."""
    return float(np.mean([r["ce"] for r in _tail(history)])) if history else math.nan


def _tail_blind_ce(history: list[dict]) -> float | None:
    """The mean video-blind cross-entropy (``blind_ce``) over a run's last quarter; None where not recorded."""
    blind = [r["blind_ce"] for r in _tail(history) if "blind_ce" in r]
    return float(np.mean(blind)) if blind else None


def diverged(history: list[dict], answer_choices: bool = True) -> bool:
    """Whether a training run learned nothing: the mean answer cross-entropy over its last quarter of steps is
    at or above 95% of what a model that ignores the video scores (``blind_ce``, each question answered with
    its mean target: :func:`workers.stllm.train.input_blind_ce`; ln 2 where a run did not record it, as yes
    and no are drawn equally often). A run at that level answers every window alike: with soft targets it
    sits well below ln 2 and still knows nothing. Only for the yes/no cross-entropy (``answer_choices``); a
    run of under 8 steps is too short to judge. A run whose loss went to NaN or infinity diverged too."""
    if not answer_choices or len(history) < 8:
        return False
    blind = _tail_blind_ce(history)
    return not _tail_ce(history) < 0.95 * (CHANCE_CE if blind is None else blind)


def train_until_learned(
    model,
    reload: Callable[[], object],
    feats: list,
    examples: list[Example],
    options: TrainOptions,
    retries: int,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict], None] | None = None,
    on_retry: Callable[[dict], None] | None = None,
) -> tuple[object, list[dict], list[dict]]:
    """:func:`workers.stllm.train.train` on ``model``; a run that :func:`diverged` starts again on a fresh
    ``reload()`` of the starting version, at the next seed and half the learning rate, up to ``retries``
    times (each retry checkpoints under ``checkpoint_dir/retry-N``, so a resumed round resumes it too).
    Returns (trained model, its losses, every attempt's {seed, lr, final_ce, diverged})."""
    attempts: list[dict] = []
    for retry in range(retries + 1):
        if retry:
            options = replace(options, seed=options.seed + 1, lr=options.lr / 2)
            log.warning(
                "training did not learn (%s); again at seed %d, lr %g", attempts[-1], options.seed, options.lr
            )
            if on_retry:
                on_retry({**attempts[-1], "next_seed": options.seed, "next_lr": options.lr})
            model = reload()
        where = checkpoint_dir / f"retry-{retry}" if checkpoint_dir and retry else checkpoint_dir
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
        history = train(model, feats, examples, options, where, progress)
        failed, tail = diverged(history, options.answer_choices), _tail_ce(history)
        blind = _tail_blind_ce(history)
        attempts.append(
            {
                "seed": options.seed,
                "lr": options.lr,
                "final_ce": round(tail, 4) if math.isfinite(tail) else None,
                "blind_ce": None if blind is None else round(blind, 4),
                "diverged": failed,
            }
        )
        if not failed:
            break
    return model, history, attempts


def checked_only(result: PrelabelResult, video: CorrectedVideo) -> PrelabelResult:
    """``result`` with the window probabilities of only the labels ``video`` was checked for: an unchecked
    label's events are unknown, so its windows say nothing about where a threshold belongs."""
    probs = {k: v for k, v in result.window_probs.items() if video.checked_for(k)}
    return result.model_copy(update={"window_probs": probs})


def tuning_videos(window_counts: dict[str, int], budget: int) -> list[str]:
    """The training videos (id -> its window count) whose windows a round scores to tune thresholds: in the
    order of their id hash (the same ones round after round, whatever else is added) up to ``budget``
    windows, at least one video; none for a budget of 0."""
    if budget <= 0:
        return []
    ids, total = [], 0
    for i in sorted(window_counts, key=unit_hash):
        if ids and total + window_counts[i] > budget:
            break
        ids.append(i)
        total += window_counts[i]
    return ids


def _score_training(
    model,
    feats: list,
    index: dict[str, int],
    spans: dict,
    snapshot: Snapshot,
    labels: list[str],
    budget: int,
) -> dict[str, PrelabelResult]:
    """Training videos' window probabilities under ``model``, from the encoder features the round already
    holds (no video is decoded again); each with only the labels its video was checked for. Only the
    :func:`tuning_videos` of ``budget`` windows: the cost stays the same however many corrections the store
    has gathered."""
    from workers.jobs import window_probabilities_many
    from workers.schemas import VideoMeta

    by_id = {v.video_id: v for v in snapshot.videos}
    ids = tuning_videos({i: len(spans[i][0]) for i in index}, budget)
    if not ids:
        return {}
    questions = [label.question() for label in snapshot.labels]
    probs = window_probabilities_many(model, [None] * len(ids), questions, 32, [feats[index[i]] for i in ids])
    out = {}
    for i, pr in zip(ids, probs, strict=True):
        windows, info = spans[i]
        r = PrelabelResult(
            video=by_id[i].video,
            model_version=model.version,
            meta=VideoMeta(fps=info.fps, n_frames=info.n_frames, duration=info.duration),
            windows=windows,
            window_probs={n: [float(x) for x in pr[:, j]] for j, n in enumerate(labels)},
        )
        out[i] = checked_only(r, by_id[i])
    return out


THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.1, 0.91, 0.05))


def tune_thresholds(
    results: dict[str, PrelabelResult],
    gt: dict[str, list[Segment]],
    labels: list[str],
    p: PrelabelSettings,
    smooth: int = 0,
) -> dict[str, float]:
    """Per label, the P(yes) threshold that gives the best AP (mean over tIoU 0.3-0.7, so edges count) on
    these videos (a round's: validation and training), each counted for the labels its ``window_probs`` hold,
    trying 0.10-0.90 on the window probabilities already scored; ties go to the
    threshold nearest 0.5. Balanced training leaves a rare label's probabilities lower than a common
    one's: one threshold for all labels would miss the rare ones even where their windows rank well.
    ``smooth`` = k scores each threshold by the mean AP of it and its k neighbours either side (a plateau
    rather than a lone peak of a few videos)."""
    out = {}
    for label in labels:
        if not any(g.label == label for i, segs in gt.items() if i in results for g in segs):
            continue  # nothing to tune on: the default stays
        having = {i: r for i, r in results.items() if label in r.window_probs}
        aps = []
        for t in THRESHOLDS:
            trial = p.model_copy(update={"thresholds": {label: t}, "high": None, "low": None})
            preds = {i: result_segments(r, [label], trial) for i, r in having.items()}
            aps.append(evaluate(preds, {i: gt[i] for i in having}, labels=[label]).mean_ap)
        scored = [
            (float(np.mean(aps[max(0, k - smooth) : k + smooth + 1])), -abs(t - 0.5), t)
            for k, t in enumerate(THRESHOLDS)
        ]
        out[label] = max(scored)[2]
    return out


def serving_windows(store: ModelStore, name: str) -> dict[str, float]:
    """The windows version ``name`` recorded (empty for a base model)."""
    return store.read()["versions"][name].get("windows") or {}


def previous_snapshot(store: ModelStore) -> Snapshot | None:
    """The snapshot the store's latest recorded round trained on (None before the first round)."""
    versions = store.read()["versions"]
    rounds = sorted(
        (int(n.split("-")[1]), v)
        for n, v in versions.items()
        if n.startswith("round-") and v.get("snapshot_path")
    )
    return load_snapshot(store.root / rounds[-1][1]["snapshot_path"]) if rounds else None


def run_round(
    store: ModelStore,
    snapshot: Snapshot,
    settings: RoundSettings | None = None,
    progress: Callable[[str, dict], None] | None = None,
    candidates: list[str] | None = None,
) -> RoundResult:
    """Run one round end to end (see the module docstring). Raises :class:`RoundRunning` when another
    round holds the store; any other failure leaves the registry unchanged and removes the candidate.
    With ``settings.next_batch`` and ``candidates`` (videos not corrected yet), the result names the next
    videos to correct, chosen by the uncertainty of the version serving after the round."""
    from workers.stllm.io import load_model, save_model, set_prelabel_defaults

    s = settings or RoundSettings()
    report = progress or (lambda stage, info: None)
    name = store.next_round()
    with store.round_lock(name):
        name = store.next_round()  # re-read under the lock
        serving_name, serving_dir = store.serving()
        work = store.root / "work" / name
        candidate_dir = store.root / "versions" / name
        timings: dict[str, float] = {}
        try:
            t = time.perf_counter()
            new_id = snapshot.id or snapshot.frozen().id
            if s.accumulate:
                snapshot = accumulate(previous_snapshot(store), snapshot)
            snap_path = save_snapshot(snapshot, store.root)
            asked = s.prelabel  # the served version is measured as it serves: its own windows unless set
            windows_now = serving_windows(store, serving_name)
            chosen = choose_windows(snapshot, s.yes_overlap)
            if windows_now and 1 / 1.5 <= chosen["window_s"] / windows_now["window_s"] <= 1.5:
                chosen = (
                    windows_now  # close enough: keep what the adapter learned on, and compare like with like
                )
            p = asked.resolved(chosen if asked.window_s is None else None)
            s = s.model_copy(update={"prelabel": p})
            ids = [v.video_id for v in snapshot.videos]
            files = {v.video_id: video_key(v.video) for v in snapshot.videos}  # one file: one side
            train_ids, val_ids = split_ids(
                ids, s.validation_fraction, group=files.__getitem__, min_validation=s.min_validation
            )
            if not train_ids or not val_ids:
                raise ValueError(
                    f"{len(ids)} corrected videos give {len(train_ids)} for training and {len(val_ids)} for "
                    "validation: a round needs both; add corrections"
                )
            report(
                "collect",
                {
                    "snapshot": snapshot.id,
                    "new": new_id,
                    "videos": len(ids),
                    "train": len(train_ids),
                    "validation": len(val_ids),
                    "window_s": p.window_s,
                    "stride_s": p.stride_s,
                },
            )

            start = store.version_dir("base") if s.train_from == "base" else serving_dir
            model = load_model(start, device=s.device, dtype=s.dtype, trainable=True)
            by_id = {v.video_id: v for v in snapshot.videos}
            feats, index, skipped, spans = [], {}, {}, {}
            for i in train_ids:
                try:
                    d = decode_windows(
                        by_id[i].video,
                        p.window_s,
                        p.stride_s,
                        p.frames_per_window,
                        p.global_frames,
                        decode_side(model),
                    )
                except Exception as e:  # e.g. an earlier round's video since deleted: the rest still train
                    log.warning("round %s: training video %s skipped: %s", name, by_id[i].video, e)
                    skipped[i] = f"{by_id[i].video}: {e}"
                    continue
                index[i] = len(feats)
                feats.append(encode_video(model, d))
                spans[i] = (d.spans, d.info)
                report("features", {"video": len(index) + len(skipped), "of": len(train_ids)})
            if not feats:
                raise ValueError(f"no training video could be read: {list(skipped.values())[:3]}")
            train_ids = [i for i in train_ids if i in index]
            examples = [
                Example(index[v], w, q, a, t) for v, w, q, a, t in window_examples(snapshot, train_ids, s)
            ]
            timings["collect_s"] = round(time.perf_counter() - t, 2)

            t = time.perf_counter()
            work.mkdir(parents=True, exist_ok=True)
            model, history, attempts = train_until_learned(
                model,
                lambda: load_model(start, device=s.device, dtype=s.dtype, trainable=True),
                feats,
                examples,
                TrainOptions(**s.train.model_dump()),
                s.retries,
                work,
                lambda k, r: report("train", {"step": k, **r}),
                lambda info: report("retry", info),
            )
            timings["train_s"] = round(time.perf_counter() - t, 2)

            t = time.perf_counter()
            if candidate_dir.exists():
                shutil.rmtree(candidate_dir)  # leftovers of a failed attempt at this round
            defaults = {"window_s": p.window_s, "stride_s": p.stride_s}
            model.prelabel_defaults = defaults
            save_model(model, candidate_dir, version=name)
            candidate = load_model(candidate_dir, device=s.device, dtype=s.dtype)
            labels = [label.name for label in snapshot.labels]
            unreadable: dict[str, str] = {}
            cand_results = _predict(candidate, snapshot, val_ids, p, unreadable)
            if s.tune_thresholds and asked.high is None and not asked.thresholds:
                # on the training videos too (their encoder features are at hand): a validation split of a
                # few videos holds a rare label's events a handful of times, and its best threshold is noise
                tuning = {i: checked_only(r, by_id[i]) for i, r in cand_results.items()}
                tuning |= _score_training(candidate, feats, index, spans, snapshot, labels, s.tune_windows)
                gt_all = {i: by_id[i].segments for i in tuning}
                defaults["thresholds"] = tune_thresholds(tuning, gt_all, labels, p)
                set_prelabel_defaults(candidate_dir, defaults)
                p = p.resolved(defaults)
            del candidate
            cand_preds = {
                i: [x for x in result_segments(r, labels, p) if by_id[i].checked_for(x.label)]
                for i, r in cand_results.items()
            }
            serving_model = load_model(serving_dir, device=s.device, dtype=s.dtype)
            serve_results = _predict(serving_model, snapshot, list(cand_preds), asked, unreadable)
            serve_preds = {i: r.segments for i, r in serve_results.items()}
            del serving_model
            # a validation video that cannot be read is left out of both sides, with its reason
            val_ids = [i for i in val_ids if i in cand_preds and i in serve_preds]
            for i, reason in unreadable.items():
                log.warning("round %s: validation video skipped: %s", name, reason)
                skipped[i] = reason
            if not val_ids:
                raise ValueError(f"no validation video could be read: {list(unreadable.values())[:3]}")
            cand_preds = {i: cand_preds[i] for i in val_ids}
            gt = {i: by_id[i].segments for i in val_ids}
            cand_metrics = evaluate(cand_preds, gt, labels=labels).to_dict()
            serve_metrics = evaluate(serve_preds, gt, labels=labels).to_dict()
            label_intervals: dict[str, tuple[float, float]] = {}
            gain, interval = bootstrap_gain(
                cand_preds, serve_preds, gt, labels, s.resamples, s.confidence, s.train.seed, label_intervals
            )

            def terms(results: dict[str, PrelabelResult]) -> dict:
                return {
                    i: window_error_terms(
                        results[i], gt[i], labels, s.yes_overlap, s.no_overlap, by_id[i].labels
                    )
                    for i in val_ids
                }

            cand_terms, serve_terms = terms(cand_results), terms(serve_results)
            window_gain, window_interval, window_label_intervals = bootstrap_window_gain(
                cand_terms, serve_terms, s.resamples, s.confidence, s.train.seed, labels
            )
            cand_metrics["window_error"] = round(window_error(cand_terms), 5)
            serve_metrics["window_error"] = round(window_error(serve_terms), 5)

            def ranking(results: dict[str, PrelabelResult]) -> dict:
                return {
                    i: window_ranking_parts(
                        results[i], gt[i], labels, s.yes_overlap, s.no_overlap, by_id[i].labels
                    )
                    for i in val_ids
                }

            auc_gain, auc_interval, auc_label_intervals = bootstrap_auc_gain(
                ranking(cand_results), ranking(serve_results), s.resamples, s.confidence, s.train.seed, labels
            )
            cand_metrics["window_auc_gain"] = round(auc_gain, 5)
            cand_metrics["window_auc_interval"] = [round(x, 5) for x in auc_interval]
            chosen = {
                "ranking": (auc_label_intervals, auc_gain, auc_interval),
                "windows": (window_label_intervals, window_gain, window_interval),
                "map": (label_intervals, None, None),
            }[s.gate_on]
            gate = decide(
                name,
                serving_name,
                cand_metrics["per_label_AP@0.5"],
                serve_metrics["per_label_AP@0.5"],
                gain,
                interval,
                s.margin,
                s.label_drop,
                s.force,
                *chosen,
                learned=not attempts[-1]["diverged"],
                statistic=s.gate_on,
            )
            timings["evaluate_s"] = round(time.perf_counter() - t, 2)
            promote, reason = gate.promote, gate.reason
            report("gate", {"promote": promote, "reason": reason})
            suggested = []
            if s.next_batch and candidates:
                after = load_model(candidate_dir if promote else serving_dir, device=s.device, dtype=s.dtype)
                # as it serves: its own windows and thresholds unless the round was told others
                suggested = suggest_next(
                    after, snapshot, candidates, s, asked.resolved(after.prelabel_defaults)
                )
                del after
                report("next", {"videos": [x["video"] for x in suggested]})
            store.add_version(
                name,
                {
                    "path": str(candidate_dir.relative_to(store.root)),
                    "parent": serving_name,
                    "trained_from": "base" if s.train_from == "base" else serving_name,
                    "base_model": store.read()["base"],
                    "snapshot": snapshot.id,
                    "snapshot_path": str(snap_path.relative_to(store.root)),
                    "settings": s.model_dump(),
                    "windows": {k: defaults[k] for k in ("window_s", "stride_s")},
                    "prelabel_defaults": defaults,
                    "skipped": skipped,
                    "metrics": {"validation": cand_metrics, "parent_validation": serve_metrics},
                    "gate": gate.to_dict(),
                    "final_loss": history[-1] if history else None,
                    "attempts": attempts,
                    "timings": timings,
                    "next_batch": suggested,
                },
                promote=promote,
            )
            shutil.rmtree(work, ignore_errors=True)
            return RoundResult(
                name,
                promote,
                serving_name,
                {"candidate": cand_metrics, "serving": serve_metrics},
                timings,
                reason,
                suggested,
            )
        except BaseException:
            shutil.rmtree(
                candidate_dir, ignore_errors=True
            )  # the registry never named it: nothing is served from it
            raise


def snapshot_for(request: RoundRequest) -> Snapshot:
    """The corrections a round request names, frozen into a snapshot here, where the videos can be probed."""
    c = request.corrections
    if isinstance(c, SnapshotCorrections):
        return c.snapshot if c.snapshot.id else c.snapshot.frozen()
    if isinstance(c, FiftyOneCorrections):
        from workers.rounds.corrections import snapshot_from_fiftyone

        return snapshot_from_fiftyone(c.dataset, c.gt_field, c.view)
    from workers.rounds.corrections import snapshot_from_labelstudio

    if c.pulled.get("url") and c.pulled.get("api_key"):  # uploads are fetched with Label Studio's key
        from workers.media import register_key

        register_key(c.pulled["url"], c.pulled["api_key"])
    return snapshot_from_labelstudio(c.pulled)


def run_round_request(request: RoundRequest, progress: Callable[[str, dict], None] | None = None) -> dict:
    """A :class:`RoundRequest` end to end (what the ``finetune`` task runs): its snapshot, then
    :func:`run_round` on its store; returns the round's result as JSON."""
    snap = snapshot_for(request)
    log.info("round on snapshot %s: %d videos from %s", snap.id, len(snap.videos), snap.sources)
    candidates = list(request.candidates)
    c = request.corrections
    if request.settings.next_batch and isinstance(c, FiftyOneCorrections) and c.view:
        from workers.rounds.corrections import fiftyone_outside_view

        candidates += fiftyone_outside_view(c.dataset, c.view)
    return asdict(run_round(ModelStore(request.store), snap, request.settings, progress, candidates))
