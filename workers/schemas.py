"""The types that cross a process boundary: jobs, results, sinks, corrections and rounds (no torch here).

The front ends, the client and the workers all speak these; defaults are defined here once, and the CLI's
options and the FiftyOne operators' forms read them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from workers.timecodes import seconds_to_frames


def default(model: type[BaseModel], name: str):
    """The default of one field of a settings model (for argparse options and operator forms)."""
    return model.model_fields[name].default


class Segment(BaseModel):
    """One event on one video: seconds [start_s, end_s) and the same span as 1-based inclusive frames."""

    model_config = ConfigDict(frozen=True)

    label: str
    start_s: float
    end_s: float
    first_frame: int
    last_frame: int
    score: float = 1.0
    # how unsure the label and edges are, 0-1 (workers.review); None for a human's segment
    uncertainty: float | None = None

    @field_serializer("start_s", "end_s")
    def _seconds(self, v: float) -> float:
        return round(v, 4)

    @field_serializer("score")
    def _score(self, v: float) -> float:
        return round(float(v), 6)

    @classmethod
    def from_seconds(
        cls,
        label: str,
        start_s: float,
        end_s: float,
        fps: float,
        n_frames: int,
        score: float = 1.0,
        uncertainty: float | None = None,
    ) -> Segment:
        first, last = seconds_to_frames(start_s, end_s, fps, n_frames)
        return cls(
            label=label,
            start_s=start_s,
            end_s=end_s,
            first_frame=first,
            last_frame=last,
            score=score,
            uncertainty=uncertainty,
        )


# Limits on what a job may ask (each is checked where the job is made, with a message naming it): every label
# is one question per window, and its text is read by the model in every window.
MAX_LABELS = 256
MAX_LABEL_NAME = 200
MAX_DESCRIPTION = 2000


class EventLabel(BaseModel):
    """One event class of a vocabulary; ``description`` goes into the question the model answers. A name
    is at most 200 characters, a description at most 2,000."""

    name: str = Field(min_length=1, max_length=MAX_LABEL_NAME)
    description: str = Field("", max_length=MAX_DESCRIPTION)

    def question(self) -> str:
        text = self.name.replace("_", " ")
        if self.description:
            return f"Does this clip show {text} ({self.description})? Answer yes or no."
        return f"Does this clip show {text}? Answer yes or no."


def parse_labels(items: list[str] | list[dict] | list[EventLabel]) -> list[EventLabel]:
    """Labels from 'name' or 'name: description' strings, dicts or EventLabels; names must be unique; at most
    :data:`MAX_LABELS`."""
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
    if len(out) > MAX_LABELS:
        raise ValueError(
            f"{len(out)} labels: a job takes at most {MAX_LABELS} (each is a question per window)"
        )
    names = [label.name for label in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate labels in the vocabulary: {dupes}")
    return out


FALLBACK_WINDOW_S = 4.0  # windows of a version that recorded none (a base model), every half window
FALLBACK_HIGH = 0.5  # P(yes) that starts an event, for a label its version set no threshold for


class PrelabelSettings(BaseModel):
    """How a video is cut into windows and how window probabilities become segments.

    ``window_s``/``stride_s`` left unset mean the windows the served version's round chose from its
    corrections (recorded in the version), else 4 s every 2 s; :meth:`resolved` makes them concrete.
    ``refine_edges`` places segment edges between window centres where the probability crosses the threshold.
    """

    window_s: float | None = Field(None, gt=0)
    stride_s: float | None = Field(None, gt=0)
    frames_per_window: int = Field(4, ge=1, le=64)
    global_frames: int = Field(16, ge=0, le=256)
    high: float | None = Field(None, ge=0, le=1)  # None: the version's per-label thresholds, else 0.5
    low: float | None = Field(None, ge=0, le=1)  # None: 0.1 below the label's high threshold
    smoothing: int = Field(1, ge=1)  # windows fit the events already: no averaging over neighbours
    min_duration_s: float = Field(0.0, ge=0)
    window_batch: int = Field(32, ge=1)
    refine_edges: bool = True
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict
    )  # per label: ``high``

    @model_validator(mode="after")
    def _thresholds(self):
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low threshold {self.low} is above high threshold {self.high}")
        return self

    def high_for(self, label: str) -> float:
        """P(yes) that starts an event of ``label``: its own threshold, else ``high``, else 0.5."""
        return self.thresholds.get(label, self.high if self.high is not None else FALLBACK_HIGH)

    def low_for(self, label: str) -> float:
        """P(yes) that keeps an event of ``label`` going (never above its high threshold)."""
        high = self.high_for(label)
        return min(self.low, high) if self.low is not None else max(0.0, high - 0.1)

    def resolved(self, recorded: dict | None = None) -> PrelabelSettings:
        """These settings made concrete with what a version recorded (``{"window_s", "stride_s",
        "thresholds"}``): explicit windows, else the recorded ones, else 4 s (an unset stride is the recorded
        one with the recorded window, else half the window); with ``high`` unset, the recorded per-label
        thresholds (a label without one: 0.5)."""
        recorded = recorded or {}
        window = self.window_s or recorded.get("window_s") or FALLBACK_WINDOW_S
        stride = self.stride_s
        if stride is None:
            same = self.window_s is None or self.window_s == recorded.get("window_s")
            stride = recorded.get("stride_s") if same and recorded.get("stride_s") else window / 2
        update = {"window_s": float(window), "stride_s": float(stride)}
        if self.high is None and not self.thresholds and recorded.get("thresholds"):
            update["thresholds"] = dict(recorded["thresholds"])
        return self.model_copy(update=update)


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
    segments: list[Segment] = Field(default_factory=list)
    meta: VideoMeta | None = None
    windows: list[tuple[float, float]] = Field(default_factory=list)
    window_probs: dict[str, list[float]] = Field(default_factory=dict)
    # how much a correction of this video would teach (workers.review): one number, and each label's
    uncertainty: float | None = None
    label_uncertainty: dict[str, float] = Field(default_factory=dict)
    error: str | None = None


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


# ------------------------------------------------------------------------------------------- sinks


class JsonlSinkSpec(BaseModel):
    """Results as JSON lines in a file, one per (video, model version)."""

    kind: Literal["jsonl"] = "jsonl"
    path: str


def _as_lists(mapping: dict) -> dict:
    """video -> [ids]: several samples or tasks may share one video file (a single id is accepted too)."""
    return {k: v if isinstance(v, list) else [v] for k, v in mapping.items()}


class FiftyOneSinkSpec(BaseModel):
    """Results onto a FiftyOne dataset's samples. ``ids``: video path -> the ids of the samples on it."""

    kind: Literal["fiftyone"] = "fiftyone"
    dataset: str
    field: str
    job: Literal["prelabel", "ask"]
    ids: dict[str, list[str]]

    @field_validator("ids", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _as_lists(value) if isinstance(value, dict) else value


class LabelStudioSinkSpec(BaseModel):
    """Pre-labels for Label Studio tasks, kept in the backend's cache (``path``) and pushed when ``url`` is set.
    ``tasks``: video source -> the ids of the tasks on it; ``config``: the project's label config XML."""

    kind: Literal["labelstudio"] = "labelstudio"
    path: str
    config: str
    tasks: dict[str, list[int]]

    @field_validator("tasks", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _as_lists(value) if isinstance(value, dict) else value

    url: str | None = None
    api_key: str | None = None


SinkSpec = Annotated[JsonlSinkSpec | FiftyOneSinkSpec | LabelStudioSinkSpec, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- corrections


class CorrectedVideo(BaseModel):
    video_id: str
    video: str
    fps: float
    n_frames: int
    duration: float
    segments: list[Segment] = Field(default_factory=list)
    source: str = ""
    source_ids: dict = Field(default_factory=dict)
    labels: list[str] | None = None  # the labels it was checked for, when not all of its snapshot's

    def checked_for(self, label: str) -> bool:
        return self.labels is None or label in self.labels


class Snapshot(BaseModel):
    """Human-checked corrections frozen for a round; its id is a hash of its content."""

    id: str = ""
    created: float = 0.0
    labels: list[EventLabel]
    videos: list[CorrectedVideo]
    sources: list[str] = Field(default_factory=list)

    def frozen(self) -> Snapshot:
        """This snapshot with its content id and creation time set."""
        body = json.dumps(
            {
                "labels": [x.model_dump() for x in self.labels],
                "videos": [v.model_dump() for v in self.videos],
            },
            sort_keys=True,
        )
        return self.model_copy(
            update={"id": hashlib.sha1(body.encode()).hexdigest()[:12], "created": time.time()}
        )


# ------------------------------------------------------------------------------------------- rounds


class TrainSettings(BaseModel):
    """How a round trains (LoRA + the small trainable parts; masking + MVM on by default)."""

    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)  # windows a step (each answers every question of its batch)
    # 1e-3: at 2e-3 one line round-1 seed of three diverged (answer CE back above chance after step 25,
    # held-out mAP@0.5 0.037); at 1e-3 the same seed reaches 0.713 (bench/README.md)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    masking: bool = True
    mvm: bool = True
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    answer_choices: bool = True  # cross-entropy over the yes/no tokens only, as inference normalises them
    paired: bool = True  # each window drawn with a yes to one question and a no to another
    # each drawn window answers all its batch's questions in one sequence, as scoring lays them out
    all_questions: bool = True
    questions_per_step: int = Field(8, ge=1, le=64)
    # a window its label's events cover in part (between RoundSettings.no_overlap and yes_overlap) trains as
    # a no toward that share as P(yes) (with all_questions); off: only windows clearly yes or no train, and
    # the partial ones drift. Demo round 2 without: P(empty_line) 0.40 / 0.73 on windows covered 0-25% /
    # 25-50%, its threshold went to 0.9 and its AP@0.5 fell 0.80 -> 0.53 (bench/README.md)
    soft_targets: bool = True


class RoundSettings(BaseModel):
    train: TrainSettings = Field(default_factory=TrainSettings)
    prelabel: PrelabelSettings = Field(default_factory=PrelabelSettings)
    validation_fraction: float = Field(0.25, gt=0, lt=1)
    # validation takes at least this many videos (a third of a smaller snapshot) where the hash gives fewer
    min_validation: int = Field(3, ge=1)
    margin: float = 0.0  # the gain's bootstrap interval must lie above this to promote
    # what the gain is measured on (workers.rounds.gate): "windows", the fall in window error (per label the
    # Brier score of each validation window's P(yes); every window a paired observation: the steadiest on a
    # few videos, bench/README.md), "ranking", the rise in window ROC-AUC per label (near 1 for most labels
    # once they are learnt, so mostly noise), or "map", mAP@0.5 (noisy on a few videos); all three are reported
    gate_on: Literal["ranking", "windows", "map"] = "windows"
    confidence: float = Field(0.9, gt=0, lt=1)  # of that interval
    resamples: int = Field(500, ge=10)
    label_drop: float = Field(0.15, ge=0, le=1)  # a label whose AP@0.5 falls by more blocks promotion
    accumulate: bool = True  # train on every earlier round's corrections too
    # "serving": a round continues the served version's adapters over all its corrections (so it starts from
    # what the served version knows, and each round adds training); "base": fresh adapters on the base model.
    # Line round 2 from round 1 vs fresh: bench/README.md
    train_from: Literal["base", "serving"] = "serving"
    tune_thresholds: bool = True  # each label's P(yes) threshold chosen on the validation videos ...
    # ... and on training videos up to this many windows (scored from the round's encoder features; a bound,
    # so a round's cost does not grow with the store's history: ~35 s on 2 CPU cores at 0.14 s a window)
    tune_windows: int = Field(256, ge=0)
    yes_overlap: float = Field(
        0.5, ge=0, le=1
    )  # a window is a 'yes' for a label when events cover this share
    no_overlap: float = Field(0.0, ge=0, le=1)  # ... and a 'no' when they cover at most this share
    force: bool = False
    # a training run whose answer cross-entropy ends no better than a video-blind answer starts again (fresh,
    # another seed, half the learning rate) up to this many times; the version records every attempt
    retries: int = Field(1, ge=0, le=3)
    # after the round, the version serving then pre-labels up to ``next_pool`` of the candidate videos (drawn
    # at random, seeded) and reports the ``next_batch`` most worth correcting (workers.review.next_batch)
    next_batch: int = Field(0, ge=0)
    next_pool: int = Field(200, ge=1)
    device: str | None = None
    dtype: str | None = "auto"


class FiftyOneCorrections(BaseModel):
    """Corrections read, where the round runs, from a FiftyOne field of human-checked events."""

    kind: Literal["fiftyone"] = "fiftyone"
    dataset: str
    gt_field: str
    view: str | None = None


class LabelStudioCorrections(BaseModel):
    """Corrections pulled from a Label Studio project (``workers.labelstudio.rest.pull_corrections``), frozen
    into a snapshot where the round runs and the videos can be probed."""

    kind: Literal["labelstudio"] = "labelstudio"
    pulled: dict


class SnapshotCorrections(BaseModel):
    kind: Literal["snapshot"] = "snapshot"
    snapshot: Snapshot


Corrections = Annotated[
    SnapshotCorrections | FiftyOneCorrections | LabelStudioCorrections, Field(discriminator="kind")
]


class RoundRequest(BaseModel):
    """What the ``finetune`` task receives: where the corrections are, and how to train."""

    corrections: Corrections
    settings: RoundSettings = Field(default_factory=RoundSettings)
    store: str | None = None
    # videos not yet corrected, for the next batch (a FiftyOne round adds its dataset's samples outside the view)
    candidates: list[str] = Field(default_factory=list)
