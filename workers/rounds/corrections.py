"""Corrections from their sources, frozen into snapshots that rounds train on.

A snapshot holds, per video: a reference (path), fps, frame count, duration, the human-checked segments
and where they came from (FiftyOne sample id, Label Studio task/annotation/prediction ids). Its id is a
hash of its content, so the same corrections give the same snapshot and a round can be reproduced.
FiftyOne and the Label Studio SDK are imported only inside the functions that read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from workers.schemas import FALLBACK_WINDOW_S, CorrectedVideo, EventLabel, Snapshot

log = logging.getLogger(__name__)


def save_snapshot(snapshot: Snapshot, store_root: Path) -> Path:
    """Write the snapshot under ``<store>/snapshots/<id>.json`` (unchanged if it is already there)."""
    snap = snapshot if snapshot.id else snapshot.frozen()
    path = store_root / "snapshots" / f"{snap.id}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(snap.model_dump_json(indent=1))
        tmp.replace(path)
    return path


def load_snapshot(path: str | Path) -> Snapshot:
    return Snapshot.model_validate_json(Path(path).read_text())


def unit_hash(video_id: str) -> float:
    return int(hashlib.sha1(video_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(video_id: str, validation_fraction: float = 0.25) -> str:
    """'train' or 'validation' from a hash of the video id: stable across rounds, so the validation score
    of round N and round N+1 compare."""
    return "validation" if unit_hash(video_id) < validation_fraction else "train"


def video_key(video: str, sample: int = 1 << 16) -> str:
    """What a video's train/validation side is drawn from: a hash of its size and its first and last
    ``sample`` bytes for a local file (the same video lands on the same side wherever the project or its
    videos are moved, and two copies of one file share a side), the reference itself for a URL or a file that
    cannot be read. The cost is bounded per video, whatever its length."""
    try:
        with open(video, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(sample)
            f.seek(max(0, size - sample))
            tail = f.read(sample)
    except OSError:
        return video
    return "file:" + hashlib.sha1(str(size).encode() + head + tail).hexdigest()


def split_ids(
    video_ids: list[str],
    validation_fraction: float = 0.25,
    group: Callable[[str], str] | None = None,
    min_validation: int = 3,
) -> tuple[list[str], list[str]]:
    """(train, validation) ids by :func:`split_of`. ``group`` maps an id to what must stay on one side (the
    video file: two tasks or samples on one file never land on both sides); default: each id alone.

    A small snapshot still gives the gate something to decide on: when the hash puts fewer than
    ``min(min_validation, groups // 3)`` groups (at least 1 where there are 2) in validation, the training
    groups with the lowest hashes join it, and when it leaves training empty the validation group with the
    highest hash trains. On one validation video no interval can tell a gain from luck (the second event set's
    12 corrected videos hashed to 1: bench/README.md). The choice is stable as the snapshot grows: a group
    that trained is only drawn into validation when the snapshot first reaches the size where the minimum
    rises (a third of it up to ``min_validation``)."""
    key = group or (lambda i: i)
    groups: dict[str, list[str]] = {}
    for i in video_ids:
        groups.setdefault(key(i), []).append(i)
    train = [g for g in groups if split_of(g, validation_fraction) == "train"]
    val = [g for g in groups if split_of(g, validation_fraction) == "validation"]
    want = max(1, min(min_validation, len(groups) // 3)) if len(groups) >= 2 else 0
    if len(val) < want:
        extra = set(sorted(train, key=unit_hash)[: want - len(val)])
        train, val = [g for g in train if g not in extra], [g for g in groups if g in extra or g in val]
    elif len(groups) >= 2 and not train:
        last = max(val, key=unit_hash)
        train, val = [last], [g for g in val if g != last]
    return [i for g in train for i in groups[g]], [i for g in val for i in groups[g]]


def accumulate(previous: Snapshot | None, new: Snapshot) -> Snapshot:
    """What a round trains on: the corrections of every earlier round (``previous``, the snapshot the last
    recorded round trained on) with ``new`` on top, so a round never learns from less than the one before.

    A video corrected again keeps its newest correction. The labels are the union (a newer description
    wins); a video keeps the labels it was checked for, so a label added later is not taken as absent from
    videos nobody checked for it."""
    if previous is None:
        return new if new.id else new.frozen()
    labels = {x.name: x for x in previous.labels} | {x.name: x for x in new.labels}
    videos: dict[str, CorrectedVideo] = {}
    for snap in (previous, new):
        names = [x.name for x in snap.labels]
        for v in snap.videos:
            checked = v.labels if v.labels is not None else names
            videos[v.video_id] = v.model_copy(
                update={"labels": None if set(checked) == set(labels) else sorted(checked)}
            )
    sources = previous.sources + [x for x in new.sources if x not in previous.sources]
    return Snapshot(labels=list(labels.values()), videos=list(videos.values()), sources=sources).frozen()


WINDOW_CHOICES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
CEILING_SHARE = 0.85  # a window is long enough to choose while its ceiling is this share of the best one's
CEILING_VIDEOS = 100  # the corrected videos the choice looks at, at most (a fixed sample: cost bounded) ...
CEILING_HOURS = 10.0  # ... and hours of them (at least one video)


def window_ceiling(snapshot: Snapshot, window_s: float, yes_overlap: float = 0.5) -> float:
    """What windows of ``window_s`` every half window allow on the snapshot's own corrections: mAP@0.5 of
    the segments that perfect window probabilities (each window's covered share as P(yes), threshold
    ``yes_overlap``, edges between window centres as pre-labeling places them) give against the corrected
    segments. Looks at up to ``CEILING_VIDEOS`` videos and ``CEILING_HOURS`` of them (those with the lowest
    id hash), so the choice costs the same however large the snapshot grows."""
    from workers.events import covered_shares, segments_from_probabilities, window_cores, windows
    from workers.rounds.evaluation import evaluate

    videos, hours = [], 0.0
    for v in sorted(snapshot.videos, key=lambda v: unit_hash(v.video_id))[:CEILING_VIDEOS]:
        if videos and hours + v.duration / 3600 > CEILING_HOURS:
            break
        videos.append(v)
        hours += v.duration / 3600
    predicted, truth = {}, {}
    for v in videos:
        names = v.labels if v.labels is not None else [x.name for x in snapshot.labels]
        spans = windows(v.duration, window_s, window_s / 2)
        cores = window_cores(spans, window_s / 2, v.duration)
        centres = [(a + b) / 2 for a, b in spans]
        segs = []
        for name in names:
            probs = covered_shares([x for x in v.segments if x.label == name], spans)
            segs += segments_from_probabilities(
                name, cores, probs, v.fps, v.n_frames, high=yes_overlap, centres=centres
            )
        predicted[v.video_id] = segs
        truth[v.video_id] = [x for x in v.segments if x.label in names]
    return evaluate(predicted, truth).map_at(0.5)


def choose_windows(snapshot: Snapshot, yes_overlap: float = 0.5) -> dict[str, float]:
    """Windows that fit the corrected events: the longest of ``WINDOW_CHOICES`` (1-16 s, stride half the
    window) whose :func:`window_ceiling` on these corrections is at least ``CEILING_SHARE`` of the best
    choice's. Short windows place edges finely, long ones cost fewer windows per hour and give each window
    more context; the ceiling says how much of what is being labelled a window length can still find. Without
    segments: 4 s every 2 s."""
    if not any(x.end_s > x.start_s for v in snapshot.videos for x in v.segments):
        return {"window_s": FALLBACK_WINDOW_S, "stride_s": FALLBACK_WINDOW_S / 2}
    ceilings = {w: window_ceiling(snapshot, w, yes_overlap) for w in WINDOW_CHOICES}
    best = max(ceilings.values())
    window = max(w for w, c in ceilings.items() if c >= CEILING_SHARE * best - 1e-9)
    log.info("windows: ceilings %s -> %.1f s", {w: round(c, 3) for w, c in ceilings.items()}, window)
    return {"window_s": window, "stride_s": window / 2}


def _vocabulary(videos: list[CorrectedVideo], labels: list[EventLabel] | None) -> list[EventLabel]:
    if labels:
        return labels
    names = sorted({s.label for v in videos for s in v.segments})
    if not names:
        raise ValueError("the corrections contain no segment: nothing to learn from")
    return [EventLabel(name=n) for n in names]


def snapshot_from_ground_truth(path: str | Path, labels: list[EventLabel] | None = None) -> Snapshot:
    """Corrections from a ``ground_truth.jsonl`` (as ``stllm generate`` writes it)."""
    videos = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        videos.append(
            CorrectedVideo(
                video_id=Path(r["video"]).name,
                video=r["video"],
                fps=r["fps"],
                n_frames=r["n_frames"],
                duration=r["duration"],
                segments=r["segments"],
                source="ground_truth",
                source_ids={"file": str(path)},
            )
        )
    return Snapshot(
        labels=_vocabulary(videos, labels), videos=videos, sources=[f"ground_truth:{path}"]
    ).frozen()


def snapshot_from_fiftyone(
    dataset_name: str, gt_field: str, view_name: str | None = None, labels: list[EventLabel] | None = None
) -> Snapshot:
    """Corrections from a FiftyOne dataset's field of human-checked temporal detections (optionally a saved
    view). Samples with an empty or missing field count as checked with no event."""
    import fiftyone as fo

    from workers.stllm.video import probe

    ds = fo.load_dataset(dataset_name)
    view = ds.load_saved_view(view_name) if view_name else ds.view()
    if gt_field not in ds.get_field_schema():
        raise ValueError(f"dataset {dataset_name!r} has no field {gt_field!r}")
    videos, unreadable = [], []
    for sample in view.select_fields(gt_field):
        try:
            info = probe(sample.filepath)
        except Exception as e:  # one unreadable video is left out, named; the rest still train
            log.warning("corrections: %s left out: %s", sample.filepath, e)
            unreadable.append(sample.filepath)
            continue
        dets = sample[gt_field].detections if sample[gt_field] is not None else []
        segs = []
        for d in dets:
            first, last = d.support
            segs.append(
                {
                    "label": d.label,
                    "start_s": (first - 1) / info.fps,
                    "end_s": last / info.fps,
                    "first_frame": first,
                    "last_frame": last,
                    "score": 1.0,
                }
            )
        videos.append(
            CorrectedVideo(
                video_id=sample.id,
                video=sample.filepath,
                fps=info.fps,
                n_frames=info.n_frames,
                duration=info.duration,
                segments=segs,
                source="fiftyone",
                source_ids={"dataset": dataset_name, "sample_id": sample.id, "field": gt_field},
            )
        )
    if not videos:
        where = f"{dataset_name!r}" + (f" view {view_name!r}" if view_name else "")
        raise ValueError(
            f"no readable samples in {where}" + (f" ({len(unreadable)} unreadable)" if unreadable else "")
        )
    source = f"fiftyone:{dataset_name}.{gt_field}" + (f"@{view_name}" if view_name else "")
    return Snapshot(labels=_vocabulary(videos, labels), videos=videos, sources=[source]).frozen()


def fiftyone_outside_view(dataset_name: str, view_name: str) -> list[str]:
    """The video files of a dataset's samples outside its saved view: what a round on that view has not
    seen corrected (candidates for the next batch)."""
    import fiftyone as fo

    ds = fo.load_dataset(dataset_name)
    inside = set(ds.load_saved_view(view_name).values("filepath"))
    return sorted({p for p in ds.values("filepath") if p not in inside})


def snapshot_from_labelstudio(pulled: dict) -> Snapshot:
    """Corrections from a Label Studio project, as ``workers.labelstudio.rest.pull_corrections`` pulls them:
    every task with a submitted annotation, its video probed here (fps, frames, duration). An annotated task
    with no region counts as checked with no event; a pre-label accepted unchanged counts as a confirmation."""
    from workers.media import fetch
    from workers.stllm.video import probe
    from workers.timecodes import seconds_to_frames

    videos = []
    for t in pulled["tasks"]:
        local = fetch(t["video"])  # uploads and cloud media: downloaded once, with Label Studio's key
        info = probe(local)
        segments = []  # Label Studio numbered frames at the project's rate; renumber at the file's own
        for s in t["segments"]:
            first, last = seconds_to_frames(s["start_s"], s["end_s"], info.fps, info.n_frames)
            segments.append({**s, "first_frame": first, "last_frame": last})
        videos.append(
            CorrectedVideo(
                video_id=f"ls:{pulled['project']}:{t['task']}",
                video=local,
                fps=info.fps,
                n_frames=info.n_frames,
                duration=info.duration,
                segments=segments,
                source="labelstudio",
                source_ids={
                    "project": pulled["project"],
                    "task": t["task"],
                    "annotation": t["annotation"],
                    "parent_prediction": t.get("parent_prediction"),
                },
            )
        )
    if not videos:
        raise ValueError(f"Label Studio project {pulled['project']} has no annotated task to learn from")
    labels = [EventLabel(**x) for x in pulled["labels"]]
    return Snapshot(
        labels=labels,
        videos=videos,
        sources=[f"labelstudio:{pulled.get('url', '')}/projects/{pulled['project']}"],
    ).frozen()
