"""Results onto a FiftyOne dataset (FiftyOne is imported when the first result is written, in the worker)."""

from __future__ import annotations

from workers.schemas import FiftyOneSinkSpec


class FiftyOneSink:
    """Writes results onto a FiftyOne dataset's samples, by sample id, in bulk.

    prelabel -> ``<field>``: TemporalDetections (label, 1-based support, confidence, uncertainty and
                model_version on each); a rerun replaces the detections of the same model version and keeps
                other versions'. ``<field>_uncertainty``: the video's review number (workers.review; sort on
                it, highest first, to review what the model is least sure of), ``<field>_version`` beside it.
    ask      -> ``<field>`` answer text, ``<field>_p_yes`` (a sortable number), ``<field>_moment``
                (TemporalDetection), ``<field>_version``.
    both     -> ``<field>_error``: why a video failed, None when it did not; ``metadata`` where missing.
    Several samples on one video file each get the result.
    FiftyOne is imported when the first result is written, inside the worker.
    """

    def __init__(self, spec: FiftyOneSinkSpec):
        self.dataset, self.field, self.job, self.ids = spec.dataset, spec.field, spec.job, spec.ids

    def write(self, records: list[dict]) -> None:
        """Write each result onto every sample of its video, one update per sample holding all its fields
        (detections or answer, error, metadata), so a sample is never left half-written. A failed result
        sets the error and keeps what the sample had (an ``ask`` rerun that fails does not erase the earlier
        answer; failed pre-labels keep the earlier detections)."""
        import fiftyone as fo

        ds = fo.load_dataset(self.dataset)
        by_sample = {sid: r for r in records for sid in self.ids.get(r["video"], [])}
        if not by_sample:
            return
        schema = ds.get_field_schema(flat=True)

        def ensure(name: str, ftype, **kwargs) -> None:  # all-None values cannot type a new field
            if name not in schema:
                ds.add_sample_field(name, ftype, **kwargs)

        f = self.field
        ensure(f"{f}_error", fo.StringField)
        if self.job == "prelabel":
            ensure(f, fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetections)
            ensure(f"{f}.detections.model_version", fo.StringField)
            ensure(f"{f}.detections.uncertainty", fo.FloatField)
            ensure(f"{f}_uncertainty", fo.FloatField)
            ensure(f"{f}_version", fo.StringField)
        else:
            ensure(f, fo.StringField)
            ensure(f"{f}_p_yes", fo.FloatField)
            ensure(f"{f}_moment", fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetection)
            ensure(f"{f}_version", fo.StringField)
        view = ds.select(list(by_sample))
        for sample in view.iter_samples(autosave=True, batch_size=len(by_sample)):
            r = by_sample[sample.id]
            sample[f"{f}_error"] = r["error"]
            meta = r.get("meta")
            if (
                meta and sample.metadata is None
            ):  # FiftyOne's compute_metadata needs ffprobe; the worker probed
                sample.metadata = fo.VideoMetadata(
                    frame_rate=meta["fps"], total_frame_count=meta["n_frames"], duration=meta["duration"]
                )
            if r["error"] is not None:
                continue
            if self.job == "prelabel":
                old = sample[f]
                kept = [
                    d
                    for d in (old.detections if old else [])
                    if d.get_field("model_version") != r["model_version"]
                ]
                new = [
                    fo.TemporalDetection(
                        label=s["label"],
                        support=[s["first_frame"], s["last_frame"]],
                        confidence=s["score"],
                        uncertainty=s.get("uncertainty"),
                        model_version=r["model_version"],
                    )
                    for s in r["segments"]
                ]
                sample[f] = fo.TemporalDetections(detections=kept + new)
                sample[f"{f}_uncertainty"] = r.get("uncertainty")
                sample[f"{f}_version"] = r["model_version"]
            else:
                m = r.get("moment")
                sample[f] = r.get("answer")
                sample[f"{f}_p_yes"] = r.get("p_yes")
                sample[f"{f}_moment"] = (
                    fo.TemporalDetection(
                        label="moment", support=[m["first_frame"], m["last_frame"]], confidence=m["score"]
                    )
                    if m
                    else None
                )
                sample[f"{f}_version"] = r["model_version"]
