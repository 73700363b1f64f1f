"""A CloudEvents consumer built on the official Python SDK (pinned by hack/setup.sh).

Listens on 127.0.0.1 (port chosen by the OS), prints `listening <port>`, then for each
POST parses the request with the SDK's HTTP binding and prints one JSON line with the
attributes the SDK read, the parsed data, the raw body and the signing headers. Exits
after `count` requests (argv[1]). A request the SDK cannot parse is answered 400 and
reported as `{"error": ...}`.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_http_event

remaining = int(sys.argv[1])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global remaining
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = from_http_event(HTTPMessage(headers=headers, body=body))
            time = event.get_time()
            out = {
                "id": event.get_id(),
                "source": event.get_source(),
                "type": event.get_type(),
                "specversion": event.get_specversion(),
                "time": time.isoformat() if time else None,
                "datacontenttype": event.get_datacontenttype(),
                "data": event.get_data(),
                "body": body.decode(),
                "webhook": {k: v for k, v in headers.items() if k.startswith("webhook-")},
                "traceparent": headers.get("traceparent"),
            }
            self.send_response(200)
        except Exception as e:  # the test reports what the SDK refused
            out = {"error": f"{type(e).__name__}: {e}"}
            self.send_response(400)
        self.end_headers()
        print(json.dumps(out), flush=True)
        remaining -= 1

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
while remaining > 0:
    server.handle_request()
