"""Job and result types shared by the workers, the client and the front ends (no torch here)."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator, model_validator


class EventLabel(BaseModel):
    """One event class of a vocabulary; ``description`` goes into the question the model answers."""

    name: str = Field(min_length=1)
    description: str = ""

    def question(self) -> str:
        text = self.name.replace("_", " ")
        if self.description:
            return f"Does this clip show {text} ({self.description})? Answer yes or no."
        return f"Does this clip show {text}? Answer yes or no."


def parse_labels(items: list[str] | list[dict] | list[EventLabel]) -> list[EventLabel]:
    """Labels from 'name' or 'name: description' strings, dicts or EventLabels; names must be unique."""
    out: list[EventLabel] = []
    for item in items:
        if isinstance(item, EventLabel):
            out.append(item)
        elif isinstance(item, dict):
            out.append(EventLabel(**item))
        else:
            name, _, desc = str(item).partition(":")
            out.append(EventLabel(name=name.strip(), description=desc.strip()))
    if not out:
        raise ValueError("the event vocabulary is empty: give at least one label")
    names = [label.name for label in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate labels in the vocabulary: {dupes}")
    return out


class PrelabelSettings(BaseModel):
    """How a video is cut into windows and how window probabilities become segments."""

    window_s: float = Field(4.0, gt=0)
    stride_s: float = Field(2.0, gt=0)
    frames_per_window: int = Field(4, ge=1, le=64)
    global_frames: int = Field(16, ge=0, le=256)
    high: float = Field(0.5, ge=0, le=1)
    low: float = Field(0.4, ge=0, le=1)
    smoothing: int = Field(3, ge=1)
    min_duration_s: float = Field(0.0, ge=0)
    window_batch: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _thresholds(self):
        if self.low > self.high:
            raise ValueError(f"low threshold {self.low} is above high threshold {self.high}")
        return self


class AskSettings(BaseModel):
    frames: int = Field(8, ge=1, le=64)
    global_frames: int = Field(16, ge=0, le=256)
    window_s: float = Field(4.0, gt=0)
    stride_s: float = Field(2.0, gt=0)
    frames_per_window: int = Field(4, ge=1, le=64)
    max_new_tokens: int = Field(48, ge=1, le=512)


_YES_NO = re.compile(
    r"^\s*(is|are|was|were|does|do|did|can|could|has|have|had|will|would|should|shall|must|may)\b", re.I
)


def is_yes_no_question(question: str) -> bool:
    """True for questions a yes or a no answers ('Does the operator skip the torque check?')."""
    return bool(_YES_NO.match(question))


class VideoMeta(BaseModel):
    fps: float
    n_frames: int
    duration: float
    variable_frame_rate: bool = False


class PrelabelResult(BaseModel):
    """Segments for one video, or the error that stopped it. ``window_probs`` (label -> P(yes) per window)
    and ``windows`` are kept so a caller can re-threshold without rerunning the model."""

    video: str
    model_version: str
    segments: list[dict] = Field(default_factory=list)
    meta: VideoMeta | None = None
    windows: list[tuple[float, float]] = Field(default_factory=list)
    window_probs: dict[str, list[float]] = Field(default_factory=dict)
    error: str | None = None

    @field_validator("segments")
    @classmethod
    def _segments_have_fields(cls, v):
        for s in v:
            missing = {"label", "start_s", "end_s", "first_frame", "last_frame", "score"} - set(s)
            if missing:
                raise ValueError(f"segment {s} lacks {sorted(missing)}")
        return v


class Moment(BaseModel):
    start_s: float
    end_s: float
    first_frame: int
    last_frame: int
    score: float


class AskResult(BaseModel):
    video: str
    question: str
    model_version: str
    answer: str | None = None
    p_yes: float | None = None
    moment: Moment | None = None
    meta: VideoMeta | None = None
    error: str | None = None
