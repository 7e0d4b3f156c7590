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

    Region ranges are integer, 1-based, inclusive frames at the project's frame rate; each region's score is
    its segment's mean P(yes). The prediction's score is the model's confidence in the whole video, 1 minus
    its review uncertainty (workers.review): the Data Manager's "Prediction score" column sorted ascending
    puts the tasks a correction teaches most first. A result without an uncertainty (made before it was
    computed) scores the mean region score (0 when the model found no event)."""
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
    if result.get("uncertainty") is not None:
        score = 1.0 - float(result["uncertainty"])
    else:
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


class RegionError(ValueError):
    """An annotation region that cannot become a training segment; the message names the region."""


def _frame(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RegionError(f"{what} must be a frame number, got {value!r}")
    if value != int(value) or value < 1:
        raise RegionError(f"{what} must be a whole frame number from 1 (frames are 1-based), got {value!r}")
    return int(value)


def segments_from_regions(regions: object, config: ProjectConfig) -> list[dict]:
    """An annotation's timelinelabels regions -> segments in seconds (and frames at the config's rate).

    Regions of other controls are ignored. A timelinelabels region that is malformed (not an object, a range
    without integer 1-based ``start`` <= ``end``, a label the config does not have) raises RegionError naming
    it: a round skips that annotation rather than train on a guess."""
    if not isinstance(regions, list):
        raise RegionError(f"an annotation's result must be a list, got {type(regions).__name__}")
    out = []
    for r in regions:
        if not isinstance(r, dict):
            raise RegionError(f"a region must be an object, got {type(r).__name__}")
        if r.get("type") != "timelinelabels" or r.get("from_name") != config.from_name:
            continue
        name = f"region {r.get('id', '?')}"
        value = r.get("value")
        if not isinstance(value, dict):
            raise RegionError(f"{name}: 'value' must be an object")
        labels, ranges = value.get("timelinelabels"), value.get("ranges")
        if not isinstance(labels, list) or not isinstance(ranges, list) or not labels or not ranges:
            raise RegionError(f"{name}: 'timelinelabels' and 'ranges' must be non-empty lists")
        for label in labels:
            if not isinstance(label, str) or label not in config.label_names:
                raise RegionError(f"{name}: label {label!r} is not one of the project's {config.label_names}")
            for rng in ranges:
                if not isinstance(rng, dict):
                    raise RegionError(f"{name}: a range must be an object")
                first, last = _frame(rng.get("start"), f"{name} start"), _frame(rng.get("end"), f"{name} end")
                if last < first:
                    raise RegionError(f"{name}: the range ends (frame {last}) before it starts ({first})")
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
