"""Label Studio label configs and timelinelabels <-> segments (no server needed for these)."""

from __future__ import annotations

import pytest

from workers.labelstudio.config import ConfigError, parse_label_config
from workers.labelstudio.timeline import prediction_from_result, segments_from_regions, timing_warning

CONFIG = """
<View>
  <Video name="video" value="$video" frameRate="25.0"/>
  <TimelineLabels name="events" toName="video">
    <Label value="jam" hint="the conveyor stopped"/><Label value="hand" alias="H"/><Label value="defect"/>
  </TimelineLabels>
</View>"""


def test_config_gives_video_frame_rate_and_labels_with_descriptions():
    c = parse_label_config(CONFIG)
    assert (c.video_name, c.video_key, c.frame_rate, c.from_name) == ("video", "video", 25.0, "events")
    assert [(x.name, x.description) for x in c.labels] == [
        ("jam", "the conveyor stopped"),
        ("hand", "H"),
        ("defect", ""),
    ]


@pytest.mark.parametrize(
    "xml, reason",
    [
        ("", "empty"),
        ("<View><Video", "not valid XML"),
        ('<View><Image name="i" value="$image"/></View>', "no <Video>"),
        (
            '<View><Video name="v" value="$video"/><Labels name="l" toName="v"><Label value="a"/></Labels></View>',
            "TimelineLabels",
        ),
        (
            '<View><Video name="v" value="$video"/><TimelineLabels name="t" toName="v"></TimelineLabels></View>',
            "no <Label>",
        ),
        (
            '<View><Video name="v" value="$video"/><TimelineLabels name="t" toName="x"><Label value="a"/></TimelineLabels></View>',
            "toName",
        ),
        (
            '<View><Video name="v" value="$video" frameRate="fast"/><TimelineLabels name="t" toName="v"><Label value="a"/></TimelineLabels></View>',
            "not a number",
        ),
    ],
)
def test_configs_that_cannot_be_served_are_refused_with_the_reason(xml, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_label_config(xml)


def _result(segments, duration=10.0, fps=10.0):
    return {
        "video": "v.mp4",
        "model_version": "round-3",
        "segments": segments,
        "meta": {"fps": fps, "n_frames": int(duration * fps), "duration": duration},
    }


def test_prediction_ranges_use_the_project_frame_rate_and_are_clamped():
    c = parse_label_config(CONFIG)  # 25 fps in the project; the file is 10 fps
    seg = {"label": "jam", "start_s": 1.0, "end_s": 2.0, "first_frame": 11, "last_frame": 20, "score": 0.8}
    late = {
        "label": "hand",
        "start_s": 9.5,
        "end_s": 12.0,
        "first_frame": 96,
        "last_frame": 100,
        "score": 0.6,
    }
    unknown = {
        "label": "not-in-config",
        "start_s": 0,
        "end_s": 1,
        "first_frame": 1,
        "last_frame": 10,
        "score": 0.9,
    }
    p = prediction_from_result(_result([seg, late, unknown]), c)
    assert p["model_version"] == "round-3" and p["score"] == pytest.approx(0.7)
    ranges = [(r["value"]["timelinelabels"][0], r["value"]["ranges"][0]) for r in p["result"]]
    assert ranges == [("jam", {"start": 26, "end": 50}), ("hand", {"start": 238, "end": 250})]
    assert all(
        r["type"] == "timelinelabels" and r["from_name"] == "events" and r["to_name"] == "video"
        for r in p["result"]
    )


def test_annotation_regions_become_segments_and_round_trip():
    c = parse_label_config(CONFIG)
    seg = {"label": "jam", "start_s": 1.0, "end_s": 2.0, "first_frame": 11, "last_frame": 20, "score": 0.8}
    regions = prediction_from_result(_result([seg]), c)["result"]
    back = segments_from_regions(regions, c)
    assert back == [
        {"label": "jam", "start_s": 1.0, "end_s": 2.0, "first_frame": 26, "last_frame": 50, "score": 1.0}
    ]
    assert segments_from_regions([{"type": "labels", "from_name": "x", "value": {}}], c) == []


def test_frame_rate_warnings_for_variable_and_mismatched_rates():
    c = parse_label_config(CONFIG)  # 25 fps
    assert timing_warning({"fps": 25.0, "variable_frame_rate": False}, c) is None
    assert "variable frame rate" in timing_warning({"fps": 24.7, "variable_frame_rate": True}, c)
    assert "10.000 fps" in timing_warning({"fps": 10.0, "variable_frame_rate": False}, c)


def test_a_prediction_that_does_not_match_the_config_is_never_pushed():
    """Label Studio accepts such predictions and then silently hides them; they are refused before any
    request (nothing listens on the address)."""
    from workers.labelstudio.rest import LabelStudioAPI, LabelStudioError

    api = LabelStudioAPI("http://127.0.0.1:9", "key")
    good = prediction_from_result(_result([]), parse_label_config(CONFIG))
    region = {
        "from_name": "events",
        "to_name": "video",
        "type": "timelinelabels",
        "value": {"ranges": [{"start": 1, "end": 5}], "timelinelabels": ["jam"]},
    }
    for bad in (
        {**region, "value": {**region["value"], "timelinelabels": ["not-a-label"]}},
        {**region, "from_name": "nope"},
    ):
        with pytest.raises(LabelStudioError, match="does not match"):
            api.push_prediction(1, {**good, "result": [bad]}, CONFIG)
    with pytest.raises(LabelStudioError, match="127.0.0.1:9"):  # a valid one goes out, and fails clearly
        api.push_prediction(1, {**good, "result": [region]}, CONFIG)


def test_media_sources_by_kind():
    from workers.labelstudio.media import MediaError, media_source

    ls = "http://ls:8080"
    assert media_source("/data/upload/3/a.mp4", 5, None, ls) == "http://ls:8080/data/upload/3/a.mp4"
    assert (
        media_source("http://ls:8080/data/upload/3/a.mp4", 5, None, ls)
        == "http://ls:8080/data/upload/3/a.mp4"
    )
    cloud = media_source("s3://bucket/line/a.mp4", 5, None, ls)
    assert cloud.startswith("http://ls:8080/tasks/5/resolve/?fileuri=")
    assert media_source("https://cdn.example/a.mp4", 5, None, ls, frozenset({"cdn.example"})).startswith(
        "https://cdn"
    )
    for bad, allowed in (("https://evil.example/a.mp4", frozenset({"cdn.example"})), ("s3://b/a.mp4", None)):
        with pytest.raises(MediaError):
            media_source(bad, 5, None, None if allowed is None else ls, allowed or frozenset())


def test_ranges_end_at_the_last_frame_that_decodes(tmp_path):
    """A region that runs to the end of a video whose container says one frame more than it decodes ends at
    the last decoded frame at the project's rate (24 without a frameRate), never one after it."""
    from helpers import video_with_a_silent_last_packet

    from workers.labelstudio.config import parse_label_config
    from workers.labelstudio.timeline import prediction_from_result
    from workers.stllm.video import probe

    info = probe(video_with_a_silent_last_packet(tmp_path / "extra.mp4", frames=50, fps=24))
    config = parse_label_config(
        '<View><Video name="video" value="$video"/><TimelineLabels name="events" toName="video">'
        '<Label value="jam"/></TimelineLabels></View>'
    )
    result = {
        "model_version": "v",
        "meta": {"duration": info.duration, "fps": info.fps},
        "segments": [{"label": "jam", "start_s": 1.0, "end_s": info.duration + 0.04, "score": 0.9}],
    }
    [region] = prediction_from_result(result, config)["result"]
    assert region["value"]["ranges"] == [{"start": 25, "end": 50}]
