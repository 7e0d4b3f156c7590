"""Fine-tune rounds: a snapshot of corrections in, a LoRA adapter out, promoted only if it measures better.

    collect   a frozen Snapshot (workers.rounds.corrections), saved in the model store
    split     train / validation by a hash of each video id (stable across rounds)
    train     window-level yes/no examples from overlap with the corrected segments, balanced;
              LoRA + projector + global-local MLP + MVM head, masking + MVM on by default, seeded, resumable
    gate      candidate vs serving version on the validation split: mAP@0.5 and mean AP over tIoU 0.3-0.7;
              promoted only if mAP@0.5 beats the serving version by ``margin`` (or forced)
    serve     the registry records the version either way; workers pick up a promoted one on their next task

A round that fails anywhere leaves the registry and the served version as they were.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from workers.events import windows
from workers.jobs import decode_side, decode_windows, prelabel_videos
from workers.rounds.corrections import save_snapshot, split_ids
from workers.rounds.evaluation import evaluate
from workers.rounds.registry import ModelStore, RegistryError
from workers.schemas import (
    FiftyOneCorrections,
    RoundRequest,
    RoundSettings,
    Segment,
    Snapshot,
    SnapshotCorrections,
)
from workers.stllm.train import Example, TrainOptions, VideoFeatures, train

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    version: str
    promoted: bool
    serving_before: str
    metrics: dict
    timings: dict
    reason: str


def init_store(store: ModelStore, base: str = "builtin") -> Path:
    """Create a model store whose base version is ``base``: a fresh model by name or spec, or a saved model
    directory (e.g. a converted ST-LLM release), saved so every worker serves the identical base."""
    from workers.stllm.io import build_model, is_model_dir, load_model, save_model

    if store.exists():
        raise RegistryError(f"model store {store.root} already exists")
    path = store.root / "versions" / "base"
    fresh = not isinstance(base, str) or not is_model_dir(base)
    save_model(
        build_model(base, device="cpu") if fresh else load_model(base, device="cpu"), path, version="base"
    )
    store.init(base, path)
    return path


def _covered(segments: list[Segment], start: float, end: float) -> float:
    """Share of [start, end) covered by the union of ``segments``."""
    spans = sorted(
        (max(s.start_s, start), min(s.end_s, end)) for s in segments if s.end_s > start and s.start_s < end
    )
    total, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / (end - start)


def window_examples(
    snapshot: Snapshot, video_ids: list[str], settings: RoundSettings
) -> list[tuple[str, int, str, str]]:
    """(video_id, window, question, yes/no) for every window and label whose target is clear."""
    p = settings.prelabel
    out = []
    by_id = {v.video_id: v for v in snapshot.videos}
    for vid in video_ids:
        v = by_id[vid]
        segs = v.segments
        for w, (s, e) in enumerate(windows(v.duration, p.window_s, p.stride_s)):
            for label in snapshot.labels:
                share = _covered([x for x in segs if x.label == label.name], s, e)
                if share >= settings.yes_overlap:
                    out.append((vid, w, label.question(), "yes"))
                elif share <= settings.no_overlap:
                    out.append((vid, w, label.question(), "no"))
    return out


def _evaluate(model, snapshot: Snapshot, video_ids: list[str], settings: RoundSettings) -> dict:
    by_id = {v.video_id: v for v in snapshot.videos}
    results = prelabel_videos(model, [by_id[i].video for i in video_ids], snapshot.labels, settings.prelabel)
    preds = {r.video: r.segments for r in results if r.error is None}
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} validation videos failed: {failed[:3]}")
    gt = {by_id[i].video: by_id[i].segments for i in video_ids}
    labels = [label.name for label in snapshot.labels]
    return evaluate(preds, gt, labels=labels).to_dict()


def run_round(
    store: ModelStore,
    snapshot: Snapshot,
    settings: RoundSettings | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> RoundResult:
    """Run one round end to end (see the module docstring). Raises :class:`RoundRunning` when another
    round holds the store; any other failure leaves the registry unchanged and removes the candidate."""
    from workers.stllm.io import load_model, save_model

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
            snap_path = save_snapshot(snapshot, store.root)
            ids = [v.video_id for v in snapshot.videos]
            train_ids, val_ids = split_ids(ids, s.validation_fraction)
            if not train_ids or not val_ids:
                raise ValueError(
                    f"{len(ids)} corrected videos give {len(train_ids)} for training and {len(val_ids)} for "
                    "validation: a round needs both; add corrections"
                )
            report("collect", {"snapshot": snapshot.id, "train": len(train_ids), "validation": len(val_ids)})

            model = load_model(serving_dir, device=s.device, dtype=s.dtype, trainable=True)
            p = s.prelabel
            by_id = {v.video_id: v for v in snapshot.videos}
            feats, index = [], {}
            for i in train_ids:
                d = decode_windows(
                    by_id[i].video,
                    p.window_s,
                    p.stride_s,
                    p.frames_per_window,
                    p.global_frames,
                    decode_side(model),
                )
                index[i] = len(feats)
                feats.append(VideoFeatures(model.frame_features(d.frames), d.window_index, d.global_index))
            examples = [Example(index[v], w, q, a) for v, w, q, a in window_examples(snapshot, train_ids, s)]
            timings["collect_s"] = round(time.perf_counter() - t, 2)

            t = time.perf_counter()
            work.mkdir(parents=True, exist_ok=True)
            history = train(
                model,
                feats,
                examples,
                TrainOptions(**s.train.model_dump()),
                work,
                progress=lambda k, r: report("train", {"step": k, **r}),
            )
            timings["train_s"] = round(time.perf_counter() - t, 2)

            t = time.perf_counter()
            if candidate_dir.exists():
                shutil.rmtree(candidate_dir)  # leftovers of a failed attempt at this round
            save_model(model, candidate_dir, version=name)
            candidate = load_model(candidate_dir, device=s.device, dtype=s.dtype)
            cand_metrics = _evaluate(candidate, snapshot, val_ids, s)
            del candidate
            serving_model = load_model(serving_dir, device=s.device, dtype=s.dtype)
            serve_metrics = _evaluate(serving_model, snapshot, val_ids, s)
            timings["evaluate_s"] = round(time.perf_counter() - t, 2)

            better = cand_metrics["mAP@0.5"] > serve_metrics["mAP@0.5"] + s.margin
            promote = better or s.force
            reason = (
                f"{name} mAP@0.5 {cand_metrics['mAP@0.5']:.3f} vs {serving_name} {serve_metrics['mAP@0.5']:.3f}"
                + (" (forced)" if s.force and not better else "")
            )
            report("gate", {"promote": promote, "reason": reason})
            store.add_version(
                name,
                {
                    "path": str(candidate_dir.relative_to(store.root)),
                    "parent": serving_name,
                    "base_model": store.read()["base"],
                    "snapshot": snapshot.id,
                    "snapshot_path": str(snap_path.relative_to(store.root)),
                    "settings": s.model_dump(),
                    "metrics": {"validation": cand_metrics, "parent_validation": serve_metrics},
                    "final_loss": history[-1] if history else None,
                    "timings": timings,
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
    return asdict(run_round(ModelStore(request.store), snap, request.settings, progress))
