"""A Label Studio project's label config, read for what this backend serves: one ``<Video>`` and the
``<TimelineLabels>`` control that labels it."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from workers.schemas import EventLabel

MAX_FRAME_RATE = 1000.0  # frames per second a <Video frameRate> may say (beyond it, a typo or an attack)
MAX_CONFIG_CHARS = 1_000_000


class ConfigError(ValueError):
    """A label config this backend cannot serve; the message says what is missing."""


@dataclass(frozen=True)
class ProjectConfig:
    video_name: str  # the <Video name=...> that regions are drawn on (to_name)
    video_key: str  # the task data key holding the video URL ($video -> "video")
    frame_rate: float  # <Video frameRate=...>: the frame numbering every range uses
    from_name: str  # the <TimelineLabels name=...>
    labels: list[EventLabel] = field(default_factory=list)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


def parse_label_config(xml: str) -> ProjectConfig:
    """Read the video and its timeline labels (a label's ``hint``, else its ``alias``, becomes its description).

    Raises ConfigError for configs without a <Video>, without <TimelineLabels> on that video, or with no labels.
    """
    if not xml or not xml.strip():
        raise ConfigError("the label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise ConfigError(f"the label config is over {MAX_CONFIG_CHARS} characters")
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", xml, re.IGNORECASE):
        raise ConfigError("the label config may not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"the label config is not valid XML: {e}") from e
    videos = {v.get("name"): v for v in root.iter() if v.tag.lower() == "video"}
    if not videos:
        raise ConfigError("the label config has no <Video> tag: this backend pre-labels video timelines")
    timelines = [t for t in root.iter() if t.tag.lower() == "timelinelabels"]
    if not timelines:
        raise ConfigError(
            "the label config has no <TimelineLabels> control: add one whose toName is the <Video>"
        )
    for t in timelines:
        video = videos.get(t.get("toName"))
        if video is None:
            continue
        value = video.get("value", "")
        if not value.startswith("$"):
            raise ConfigError(
                f'<Video name={video.get("name")!r}> must take its URL from task data (value="$video")'
            )
        try:
            fps = float(video.get("frameRate", "24"))
        except ValueError as e:
            raise ConfigError(f"<Video frameRate={video.get('frameRate')!r}> is not a number") from e
        if not math.isfinite(fps) or not 0 < fps <= MAX_FRAME_RATE:
            raise ConfigError(
                f"<Video frameRate={video.get('frameRate')!r}> must be a number in (0, {MAX_FRAME_RATE}]"
            )
        labels = [
            EventLabel(name=lab.get("value"), description=lab.get("hint") or lab.get("alias") or "")
            for lab in t
            if lab.tag.lower() == "label" and lab.get("value")
        ]
        if not labels:
            raise ConfigError(f"<TimelineLabels name={t.get('name')!r}> has no <Label> children")
        names = [label.name for label in labels]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"<TimelineLabels name={t.get('name')!r}> repeats the label values {twice}")
        return ProjectConfig(video.get("name"), value[1:], fps, t.get("name"), labels)
    raise ConfigError("no <TimelineLabels> control points at a <Video> (toName must be the video's name)")
