"""An OTLP/HTTP trace collector that decodes with the OpenTelemetry protocol's own Python
package (`opentelemetry-proto`, pinned by hack/setup.sh), not the operator's code.

Listens on 127.0.0.1 (port chosen by the OS), prints `listening <port>`, then for each POST
to /v1/traces parses the body as OTLP JSON into `ExportTraceServiceRequest` with
protobuf's JSON parser (strict: an unknown field or a wrong type is refused) and prints
one JSON line per span: name, kind, trace and span ids (hex), parent, attributes. The only
step before the parser is the one OTLP/JSON defines over protobuf's JSON mapping: trace
and span ids are hex, not base64. A body it cannot parse is answered 400 and reported as
`{"error": ...}`. Runs until killed.
"""

import base64
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def hex_ids_to_base64(value):
    if isinstance(value, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ID_FIELDS and isinstance(v, str)
            else hex_ids_to_base64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [hex_ids_to_base64(v) for v in value]
    return value


def any_value(v: AnyValue):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            if self.path != "/v1/traces":
                raise ValueError(f"path {self.path}")
            request = ExportTraceServiceRequest()
            json_format.Parse(json.dumps(hex_ids_to_base64(json.loads(body))), request)
            lines = []
            for resource in request.resource_spans:
                service = {
                    a.key: any_value(a.value) for a in resource.resource.attributes
                }.get("service.name")
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        lines.append(
                            {
                                "service": service,
                                "name": span.name,
                                "kind": Span.SpanKind.Name(span.kind),
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "attributes": {
                                    a.key: any_value(a.value) for a in span.attributes
                                },
                            }
                        )
            self.send_response(200)
        except Exception as e:  # the test reports what the decoder refused
            lines = [{"error": f"{type(e).__name__}: {e}"}]
            self.send_response(400)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")
        for line in lines:
            print(json.dumps(line), flush=True)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
