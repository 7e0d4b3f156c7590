"""Results onto a FiftyOne dataset (FiftyOne is imported when the first result is written, in the worker)."""

from __future__ import annotations

from workers.schemas import FiftyOneSinkSpec


class FiftyOneSink:
    """Writes results onto a FiftyOne dataset's samples, by sample id, in bulk.

    prelabel -> ``<field>``: TemporalDetections (label, 1-based support, confidence, model_version on each);
                a rerun replaces the detections of the same model version and keeps other versions'.
    ask      -> ``<field>`` answer text, ``<field>_p_yes`` (a sortable number), ``<field>_moment``
                (TemporalDetection), ``<field>_version``.
    both     -> ``<field>_error``: why a video failed, None when it did not.
    FiftyOne is imported when the first result is written, inside the worker.
    """

    def __init__(self, spec: FiftyOneSinkSpec):
        self.dataset, self.field, self.job, self.ids = spec.dataset, spec.field, spec.job, spec.ids

    def write(self, records: list[dict]) -> None:
        import fiftyone as fo

        ds = fo.load_dataset(self.dataset)
        rows = [(self.ids[r["video"]], r) for r in records if r["video"] in self.ids]
        if not rows:
            return
        schema = ds.get_field_schema()

        def ensure(name: str, ftype, **kwargs) -> None:  # all-None values cannot type a new field
            if name not in schema:
                ds.add_sample_field(name, ftype, **kwargs)

        ensure(f"{self.field}_error", fo.StringField)
        if self.job == "prelabel":
            ensure(self.field, fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetections)
        else:
            ensure(self.field, fo.StringField)
            ensure(f"{self.field}_p_yes", fo.FloatField)
            ensure(f"{self.field}_moment", fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetection)
            ensure(f"{self.field}_version", fo.StringField)
        sample_ids = [sid for sid, _ in rows]
        errors = {sid: r["error"] for sid, r in rows}
        if self.job == "prelabel":
            view = ds.select(sample_ids)
            current = (
                dict(zip(view.values("id"), view.values(self.field), strict=True))
                if self.field in ds.get_field_schema()
                else {}
            )
            values = {}
            for sid, r in rows:
                old = current.get(sid)
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
                        model_version=r["model_version"],
                    )
                    for s in r["segments"]
                ]
                values[sid] = fo.TemporalDetections(detections=kept + new) if r["error"] is None else old
            ds.set_values(self.field, values, key_field="id", dynamic=True)
        else:
            answers = {sid: r.get("answer") for sid, r in rows}
            p_yes = {sid: r.get("p_yes") for sid, r in rows}
            versions = {sid: r["model_version"] for sid, r in rows}
            moments = {}
            for sid, r in rows:
                m = r.get("moment")
                moments[sid] = (
                    fo.TemporalDetection(
                        label="moment", support=[m["first_frame"], m["last_frame"]], confidence=m["score"]
                    )
                    if m
                    else None
                )
            ds.set_values(self.field, answers, key_field="id")
            ds.set_values(f"{self.field}_p_yes", p_yes, key_field="id")
            ds.set_values(f"{self.field}_moment", moments, key_field="id")
            ds.set_values(f"{self.field}_version", versions, key_field="id")
        ds.set_values(f"{self.field}_error", errors, key_field="id")
        self._fill_metadata(ds, rows)

    @staticmethod
    def _fill_metadata(ds, rows: list[tuple[str, dict]]) -> None:
        """Video metadata from the worker's own probe (PyAV), for samples that have none: FiftyOne's
        compute_metadata needs ffprobe, which many machines lack, and TemporalDetection.from_timestamps
        and the App's timeline need frame rate and count."""
        import fiftyone as fo

        view = ds.select([sid for sid, _ in rows])
        have = dict(zip(view.values("id"), view.values("metadata"), strict=True))
        values = {}
        for sid, r in rows:
            meta = r.get("meta")
            if meta and have.get(sid) is None:
                values[sid] = fo.VideoMetadata(
                    frame_rate=meta["fps"], total_frame_count=meta["n_frames"], duration=meta["duration"]
                )
        if values:
            ds.set_values("metadata", values, key_field="id")
