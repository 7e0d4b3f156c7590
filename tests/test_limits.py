"""Bounded inputs fail alone with the reason and the documented limit; downloads are capped and timed; the
media cache is bounded; appends survive a torn line."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from helpers import StubServer

from workers.schemas import MAX_DESCRIPTION, MAX_LABELS, parse_labels
from workers.stllm.video import VideoError, VideoLimits, probe


def _video_with_a_frame_far_ahead(path, seconds: int):
    """An H.264 Matroska file of 10 frames at 10 fps whose last frame is shown ``seconds`` later (a real
    frame, which decodes)."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = __import__("fractions").Fraction(1, 10)
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            frame.pts = i if i < 9 else seconds * 10
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def test_absurd_durations_and_resolutions_fail_with_the_limit(tmp_path, tiny_model, monkeypatch):
    from workers.jobs import prelabel_videos
    from workers.tools.linevideo import generate_dataset

    far = _video_with_a_frame_far_ahead(tmp_path / "far.mkv", seconds=400 * 3600)
    with pytest.raises(VideoError, match="over the limit of 48 h"):
        probe(far)
    good = generate_dataset(tmp_path / "v", 1, seed=3, duration=4.0)[0]["video"]
    with pytest.raises(VideoError, match="pixels a frame"):
        probe(good, VideoLimits(max_pixels=100))
    monkeypatch.setenv("STLLM_MAX_VIDEO_PIXELS", "100")  # what jobs read
    results = prelabel_videos(tiny_model, [str(far), good], parse_labels(["jam"]))
    assert "48 h" in results[0].error and "far.mkv" in results[0].error
    assert "pixels a frame" in results[1].error


def test_vocabularies_and_descriptions_are_bounded():
    with pytest.raises(ValueError, match=f"at most {MAX_LABELS}"):
        parse_labels([f"label_{i}" for i in range(MAX_LABELS + 1)])
    with pytest.raises(ValueError, match="2000"):
        parse_labels([{"name": "jam", "description": "x" * (MAX_DESCRIPTION + 1)}])
    with pytest.raises(ValueError):
        parse_labels(["x" * 1_000_000])
    assert len(parse_labels([f"label_{i}" for i in range(MAX_LABELS)])) == MAX_LABELS


@pytest.fixture()
def media(tmp_path, monkeypatch):
    import workers.media as media

    monkeypatch.setenv("STLLM_MEDIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STLLM_LS_ALLOW_PRIVATE", "127.0.0.1")
    monkeypatch.setattr(media, "_keys", {})
    return media


def test_downloads_have_a_size_cap_and_a_deadline(media, monkeypatch, tmp_path):
    def big(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10_000))
        h.end_headers()
        h.wfile.write(b"x" * 10_000)

    def drip(h):  # a sender that keeps the connection alive without ever finishing
        h.send_response(200)
        h.end_headers()
        for _ in range(40):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    def endless_without_length(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b"x" * 20_000)

    servers = [StubServer(big), StubServer(drip), StubServer(endless_without_length)]
    try:
        monkeypatch.setenv("STLLM_MEDIA_MAX_BYTES", "5000")
        with pytest.raises(VideoError, match="over the limit"):
            media.fetch(f"{servers[0].url}/v.mp4")
        with pytest.raises(VideoError, match="over the limit"):
            media.fetch(f"{servers[2].url}/v.mp4")
        monkeypatch.setenv("STLLM_MEDIA_DEADLINE", "1")
        t = time.monotonic()
        with pytest.raises(VideoError, match="longer than 1 s"):
            media.fetch(f"{servers[1].url}/v.mp4")
        assert time.monotonic() - t < 3.5
        assert not list((tmp_path / "cache").iterdir())  # nothing cached
    finally:
        for s in servers:
            s.close()


def test_the_media_cache_is_bounded_least_recently_used_first(media, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    now = time.time()
    for i, age in enumerate((4000, 3000, 2000, 1000)):
        p = cache / f"{i}.mp4"
        p.write_bytes(b"x" * 100)
        os.utime(p, (now - age, now - age))
    (cache / "fresh.mp4").write_bytes(b"x" * 100)  # just used: kept even over the bound
    media.bound_cache(cache, max_bytes=250, keep=cache / "3.mp4")
    # oldest first until 250 bytes are left: 0, 1 and 2 go; 3 is the one just fetched, "fresh" was just used
    assert sorted(p.name for p in cache.iterdir()) == ["3.mp4", "fresh.mp4"]


def test_a_torn_last_line_loses_no_later_record(tmp_path, caplog):
    from workers.sinks.files import AppendLog

    log = AppendLog(tmp_path / "corrections.jsonl")
    log.write([{"id": "a", "n": 1}])
    with open(log.path, "a") as f:
        f.write('{"id": "b", "n"')  # a crash, or a full disk, mid-line
    log.write([{"id": "c", "n": 3}])
    with caplog.at_level("WARNING"):
        rows = log.read()
    assert [r["id"] for r in rows] == ["a", "c"] and "not a whole record" in caplog.text
    assert json.loads(log.path.read_text().splitlines()[0]) == {"id": "a", "n": 1}
