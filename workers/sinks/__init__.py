"""Where tasks write their results: one sink per :data:`workers.schemas.SinkSpec` kind, built in
:func:`sink_from`. Every sink is idempotent: writing the same video and model version again replaces the
earlier result, so a redelivered task never doubles a result."""

from __future__ import annotations

from pydantic import TypeAdapter

from workers.schemas import FiftyOneSinkSpec, JsonlSinkSpec, LabelStudioSinkSpec, SinkSpec
from workers.sinks.files import AppendLog, JsonlSink

__all__ = ["AppendLog", "JsonlSink", "sink_from", "parse_sink"]

_SPEC = TypeAdapter(SinkSpec)


def parse_sink(description: dict | SinkSpec | None) -> SinkSpec | None:
    """A sink spec from its JSON form (what a job carries to the workers); ValueError names what is wrong."""
    if description is None or isinstance(description, JsonlSinkSpec | FiftyOneSinkSpec | LabelStudioSinkSpec):
        return description
    return _SPEC.validate_python(description)


def sink_from(description: dict | SinkSpec | None):
    """The sink a spec describes (None: results are kept with the job only)."""
    spec = parse_sink(description)
    if spec is None:
        return None
    if isinstance(spec, JsonlSinkSpec):
        return JsonlSink(spec.path)
    if isinstance(spec, FiftyOneSinkSpec):
        from workers.sinks.fiftyone import FiftyOneSink

        return FiftyOneSink(spec)
    from workers.sinks.labelstudio import LabelStudioSink

    return LabelStudioSink(spec)
