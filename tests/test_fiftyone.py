"""The FiftyOne plugin through plugin discovery on a real FiftyOne database, embedded default (no broker)."""

from __future__ import annotations

import pytest

from workers.rounds.evaluation import evaluate
from workers.schemas import Segment
from workers.tools.linevideo import generate_dataset

PREFIX = "@stllm/labeling/"


@pytest.fixture()
def embedded(monkeypatch, model_dir):
    monkeypatch.delenv("STLLM_BROKER_URL", raising=False)
    monkeypatch.setenv("STLLM_MODEL", model_dir)
    monkeypatch.setenv("STLLM_DTYPE", "fp32")


@pytest.fixture()
def video_dataset(fiftyone, tmp_path):
    fo = fiftyone
    records = generate_dataset(tmp_path / "v", 3, seed=600, duration=8.0)
    bad = tmp_path / "v" / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    ds = fo.Dataset()
    samples = []
    for r in records:
        s = fo.Sample(filepath=r["video"])
        s["gt"] = fo.TemporalDetections(
            detections=[
                fo.TemporalDetection(label=g["label"], support=[g["first_frame"], g["last_frame"]])
                for g in r["segments"]
            ]
        )
        samples.append(s)
    samples.append(fo.Sample(filepath=str(bad)))
    ds.add_samples(samples)
    yield ds, records, str(bad)
    ds.delete()


def run(fo_module, name, ds, **params):
    """Execute an operator as the App would; without a pool our operators ask for delegation, so the
    queued operation is then run the way `fiftyone delegated launch` runs it."""
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService

    result = foo.execute_operator(PREFIX + name, dataset=ds, params=params)
    if result.error is None and result.delegated:
        (result,) = DelegatedOperationService().execute_queued_operations(dataset_name=ds.name)
    return result


def test_the_plugin_is_discovered_with_all_its_operators(fiftyone):
    from fiftyone.operators.registry import OperatorRegistry

    reg = OperatorRegistry()
    uris = {op.uri for op in reg.list_operators()}
    names = ("prelabel_events", "ask_videos", "finetune_round", "job_status", "review_next")
    assert {PREFIX + n for n in names} <= uris
    assert not [e for e in reg.list_errors() if "stllm" in str(e)]


def test_prelabel_writes_temporal_detections_errors_and_provenance(fiftyone, embedded, video_dataset):
    fo = fiftyone
    ds, records, bad = video_dataset
    result = run(
        fo,
        "prelabel_events",
        ds,
        labels=["jam", "hand", "empty_line"],
        output_field="pred",
        high=0.0,
        window_s=2.0,
        stride_s=1.0,
        frames_per_window=2,
    )
    assert result.error is None, result.error
    assert result.result["videos"] == 4 and result.result["state"] == "SUCCESS"
    ds.reload()
    assert ds.get_field("pred").document_type == fo.TemporalDetections
    for sample in ds:
        if sample.filepath == bad:
            assert bad in sample["pred_error"] and sample["pred"] is None
            continue
        assert sample["pred_error"] is None
        assert sample.metadata.frame_rate == 10.0 and sample.metadata.total_frame_count == 80  # from PyAV
        dets = sample["pred"].detections
        assert {d.label for d in dets} == {"jam", "hand", "empty_line"}
        for d in dets:
            assert d.support[0] >= 1 and d.support[1] <= 80 and d.model_version == "tiny@base"
            assert 0 <= d.confidence <= 1
    runs = ds.info["stllm_runs"]
    assert runs[result.result["job_id"]]["field"] == "pred"
    # FiftyOne's own evaluation runs on the written field
    good = ds.match(fo.ViewField("pred_error") == None)  # noqa: E711
    res = good.evaluate_detections("pred", gt_field="gt", eval_key="ev", compute_mAP=True)
    assert 0.0 <= res.mAP() <= 1.0


def test_uncertainty_is_stored_and_the_review_view_puts_the_least_sure_first(
    fiftyone, embedded, video_dataset
):
    ds, _, bad = video_dataset
    result = run(fiftyone, "prelabel_events", ds, labels=["jam", "hand"], output_field="pred")
    assert result.error is None, result.error
    ds.reload()
    assert ds.get_field("pred_uncertainty") is not None  # a float field: sortable in the App's sidebar
    good = ds.exists("pred_uncertainty")
    assert len(good) == 3 and bad not in good.values("filepath")
    for sample in good:
        assert 0.0 <= sample["pred_uncertainty"] <= 1.0 and sample["pred_version"] == "tiny@base"
        for d in sample["pred"].detections:
            assert 0.0 <= d["uncertainty"] <= 1.0
    # a spread of values to order: the stored numbers of two samples are set apart
    ids = good.values("id")
    for sid, u in zip(ids, (0.2, 0.9, 0.5), strict=True):
        sample = ds[sid]
        sample["pred_uncertainty"] = u
        sample.save()
    result = run(fiftyone, "review_next", ds, field="pred", view_name="to_review")
    assert result.error is None, result.error
    assert result.result == {"view": "to_review", "samples": 3}
    saved = ds.load_saved_view("to_review")
    assert saved.values("pred_uncertainty") == [0.9, 0.5, 0.2]
    assert saved.values("id") == [ids[1], ids[2], ids[0]]
    run(fiftyone, "review_next", ds, field="pred", view_name="to_review", top=1)  # replaces the view
    assert ds.load_saved_view("to_review").values("id") == [ids[1]]


def test_a_rerun_replaces_the_same_versions_labels(fiftyone, embedded, video_dataset):
    ds, _, _ = video_dataset
    for _ in range(2):
        run(fiftyone, "prelabel_events", ds, labels=["jam"], output_field="pred", high=0.0)
    ds.reload()
    counts = [len(s["pred"].detections) for s in ds if s["pred"] is not None]
    assert counts == [1, 1, 1]  # threshold 0: one whole-video segment per label, not doubled


def test_ask_writes_answer_p_yes_and_moment(fiftyone, embedded, video_dataset):
    ds, _, bad = video_dataset
    result = run(fiftyone, "ask_videos", ds, question="Is the line jammed?", output_field="qa")
    assert result.error is None, result.error
    ds.reload()
    good = ds.exists("qa_error", False)
    assert len(good) == 3
    assert all(0 <= p <= 1 for p in good.values("qa_p_yes"))
    assert all(isinstance(a, str) for a in good.values("qa"))
    assert all(m.support[0] >= 1 for m in good.values("qa_moment"))
    assert sorted(good.sort_by("qa_p_yes").values("qa_p_yes")) == good.sort_by("qa_p_yes").values("qa_p_yes")


def form_error(name: str, ds, **params) -> str:
    """The validation error the operator's form reports for these inputs (nothing is executed)."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError, match="Validation error") as e:
        foo.execute_operator(PREFIX + name, dataset=ds, params=params)
    return str(e.value)


def test_form_validation_errors(fiftyone, embedded, video_dataset, tmp_path):
    fo = fiftyone
    ds, _, _ = video_dataset
    assert "at least one event label" in form_error("prelabel_events", ds, labels=[])
    assert "not TemporalDetections" in form_error(
        "prelabel_events", ds, labels=["jam"], output_field="filepath"
    )
    assert "question is empty" in form_error("ask_videos", ds, question="   ")
    images = fo.Dataset()
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")
    images.add_sample(fo.Sample(filepath=str(img)))
    assert "not video" in form_error("prelabel_events", images, labels=["jam"])
    images.delete()


def test_job_status_lists_the_datasets_jobs(fiftyone, embedded, video_dataset):
    ds, _, _ = video_dataset
    run(fiftyone, "prelabel_events", ds, labels=["jam"], output_field="pred")
    status = run(fiftyone, "job_status", ds)
    assert status.error is None
    jobs = status.result["jobs"]
    assert len(jobs) == 1 and jobs[0]["total"] == 4 and jobs[0]["failed"] == 1 and jobs[0]["done"] == 3


def test_written_predictions_evaluate_like_our_own_map(fiftyone, embedded, video_dataset):
    ds, records, _ = video_dataset
    run(fiftyone, "prelabel_events", ds, labels=["empty_line", "part_passing"], output_field="pred")
    ds.reload()
    good = ds.exists("pred_error", False)
    res = good.evaluate_detections("pred", gt_field="gt", eval_key="ev2", compute_mAP=True, iou_threshs=[0.5])
    preds = {
        s.filepath: [
            Segment(
                label=d.label,
                start_s=0,
                end_s=0,
                first_frame=d.support[0],
                last_frame=d.support[1],
                score=d.confidence,
            )
            for d in s["pred"].detections
        ]
        for s in good
    }
    gts = {
        s.filepath: [
            Segment(label=d.label, start_s=0, end_s=0, first_frame=d.support[0], last_frame=d.support[1])
            for d in s["gt"].detections
        ]
        for s in good
    }
    ours = evaluate(preds, gts, thresholds=[0.5], span="frames")
    assert ours.mean_ap == pytest.approx(res.mAP(), abs=1e-9)


def test_a_round_from_the_operator_reports_its_stages_steps_and_loss(
    fiftyone, embedded, video_dataset, tmp_path, tiny_spec, monkeypatch
):
    """The finetune_round operator, delegated, runs the round on the dataset's checked field (the corrupt
    video left out), and the operation's progress goes through collect, training steps with the loss, the
    gate; the registry records the round."""
    from fiftyone.operators.delegated import DelegatedOperationService

    from workers.rounds.registry import ModelStore
    from workers.rounds.run import init_store

    store = ModelStore(tmp_path / "store")
    init_store(store, tiny_spec)
    monkeypatch.setenv("STLLM_MODEL_STORE", str(store.root))
    seen = []
    real = DelegatedOperationService.set_progress

    def record(self, doc_id, progress):
        seen.append((progress.progress, progress.label))
        return real(self, doc_id, progress)

    monkeypatch.setattr(DelegatedOperationService, "set_progress", record)
    ds, _, _ = video_dataset
    result = run(fiftyone, "finetune_round", ds, gt_field="gt", steps=3, force=True)
    assert result.error is None, result.error
    assert result.result["state"] == "SUCCESS" and result.result["version"] == "round-1"
    labels = [label for _, label in seen]
    assert any(x.startswith("collect") for x in labels) and any(x.startswith("gate") for x in labels)
    steps = [x for x in labels if x.startswith("training: step")]
    assert [x.split()[2] for x in steps] == ["1/3,", "2/3,", "3/3,"] and all("loss" in x for x in steps)
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)  # progress only moves forward
    snapshot = store.read()["versions"]["round-1"]["snapshot_path"]
    assert (
        len(ModelStore(store.root).read()["versions"]) == 2
        and "corrupt" not in (store.root / snapshot).read_text()
    )


def test_samples_on_one_file_all_get_results_and_a_failed_rerun_keeps_the_answer(
    fiftyone, embedded, video_dataset
):
    """Two samples on the same video file each get its pre-labels (decoded once); an ask rerun whose video
    now fails sets the error and keeps each sample's earlier answer, detections and metadata."""
    from pathlib import Path

    from fiftyone import ViewField as F

    fo = fiftyone
    ds, records, _ = video_dataset
    path = records[0]["video"]
    ds.add_sample(fo.Sample(filepath=path))
    assert run(fiftyone, "prelabel_events", ds, labels=["jam"], output_field="pred", high=0.0).error is None
    assert run(fiftyone, "ask_videos", ds, question="Is the line jammed?", output_field="qa").error is None
    ds.reload()
    twins = ds.match(F("filepath") == path)
    assert len(twins) == 2 and all(len(s["pred"].detections) == 1 and s["qa"] for s in twins)
    before = {s.id: (s["qa"], s["qa_p_yes"], len(s["pred"].detections)) for s in twins}
    saved = Path(path).read_bytes()
    Path(path).write_bytes(b"no longer a video")
    try:
        assert (
            run(fiftyone, "ask_videos", ds, question="Is the line jammed?", output_field="qa").error is None
        )
    finally:
        Path(path).write_bytes(saved)
    ds.reload()
    for s in ds.match(F("filepath") == path):
        assert (s["qa"], s["qa_p_yes"], len(s["pred"].detections)) == before[s.id]
        assert path in s["qa_error"] and s.metadata is not None and s.metadata.total_frame_count > 0
