"""timelinelabels <-> segments: the one place that turns model segments into Label Studio regions and
annotators' regions back into segments.

Label Studio numbers frames with the project's ``<Video frameRate>``, not the file's own rate, so ranges
are converted through seconds (workers.timecodes) and clamped to the video's length at that rate.
"""

from __future__ import annotations

import hashlib
import math

from workers.labelstudio.config import ProjectConfig
from workers.timecodes import frames_to_seconds, seconds_to_frames


def frames_at_config_rate(duration_s: float, config: ProjectConfig) -> int:
    return max(1, math.ceil(duration_s * config.frame_rate - 1e-6))


def prediction_from_result(result: dict, config: ProjectConfig) -> dict:
    """A worker's pre-label result -> one Label Studio prediction (model_version, score, regions).

    Region ranges are integer, 1-based, inclusive frames at the project's frame rate; the prediction's score
    is the mean region score (0 when the model found no event)."""
    meta = result["meta"]
    n = frames_at_config_rate(meta["duration"], config)
    regions = []
    for s in result["segments"]:
        if s["label"] not in config.label_names:
            continue
        first, last = seconds_to_frames(s["start_s"], s["end_s"], config.frame_rate, n)
        rid = hashlib.sha1(f"{s['label']}:{first}:{last}".encode()).hexdigest()[:10]
        regions.append(
            {
                "id": rid,
                "from_name": config.from_name,
                "to_name": config.video_name,
                "type": "timelinelabels",
                "score": round(float(s["score"]), 4),
                "value": {"ranges": [{"start": first, "end": last}], "timelinelabels": [s["label"]]},
            }
        )
    score = sum(r["score"] for r in regions) / len(regions) if regions else 0.0
    return {"result": regions, "score": round(score, 4), "model_version": result["model_version"]}


def timing_warning(meta: dict, config: ProjectConfig) -> str | None:
    """Why this video's frame numbers in Label Studio may not match the video, or None.

    Label Studio maps frame numbers to time with the project's ``frameRate`` only: a variable-frame-rate
    file drifts in its player, and a file at another rate has frame numbers that differ from its own."""
    if meta.get("variable_frame_rate"):
        return (
            f"variable frame rate video (average {meta['fps']:.3f} fps): Label Studio assumes a constant "
            f"{config.frame_rate:g} fps, so regions may drift in its player; transcode to a constant rate"
        )
    if abs(meta["fps"] - config.frame_rate) > 0.01:
        return (
            f"video is {meta['fps']:.3f} fps but the project's <Video frameRate> is {config.frame_rate:g}: "
            "ranges were converted through seconds at the project's rate"
        )
    return None


def segments_from_regions(regions: list[dict], config: ProjectConfig) -> list[dict]:
    """An annotation's timelinelabels regions -> segments in seconds (and frames at the config's rate)."""
    out = []
    for r in regions:
        if r.get("type") != "timelinelabels" or r.get("from_name") != config.from_name:
            continue
        value = r.get("value") or {}
        for label in value.get("timelinelabels", []):
            for rng in value.get("ranges", []):
                first, last = int(rng["start"]), int(rng["end"])
                start_s, end_s = frames_to_seconds(first, last, config.frame_rate)
                out.append(
                    {
                        "label": label,
                        "start_s": start_s,
                        "end_s": end_s,
                        "first_frame": first,
                        "last_frame": last,
                        "score": 1.0,
                    }
                )
    return out
