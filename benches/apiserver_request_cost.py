#!/usr/bin/env python3
"""What one API-server request of each kind the operator makes costs the kube-apiserver
and etcd in CPU time, on this machine: the bound of the scale benchmark's Ready time
(BENCHMARKS.md, issue 17). Not a test; prints one table.

    python3 benches/apiserver_request_cost.py [N]     # N objects per phase, default 3000

Starts its own etcd + kube-apiserver (hack/controlplane.sh, loopback, stopped at the end),
applies the CRDs from crds/, keeps one watch on the WebhookSubscriptions open (as the
operator does), then times each kind of request in turn from 16 threads and divides the
CPU time the two processes used (/proc/PID/stat) by the requests made.
"""
import http.client, json, os, re, ssl, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
GROUP = "/apis/hooks.webhook-operator.dev/v1alpha1/namespaces/bench/webhooksubscriptions"
SECRETS = "/api/v1/namespaces/bench/secrets"
NOW = "2026-12-02T02:00:00Z"


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    work = Path(tempfile.mkdtemp(prefix="wo-apicost-"))
    cp = work / "cp"
    subprocess.run([ROOT / "hack/controlplane.sh", "start", cp, str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        run(cp)
    finally:
        subprocess.run([ROOT / "hack/controlplane.sh", "stop", cp], stdout=subprocess.DEVNULL)


def run(cp):
    kubeconfig = (cp / "kubeconfig").read_text()
    port = int(re.search(r"server: https://127\.0\.0\.1:(\d+)", kubeconfig).group(1))
    token = re.search(r"token: (\S+)", kubeconfig).group(1)
    tls = ssl.create_default_context(cafile=str(cp / "certs/ca.crt"))
    pids = {name: int((cp / f"{name}.pid").read_text()) for name in ("apiserver", "etcd")}
    local = threading.local()

    def call(method, path, body=None, content_type="application/json"):
        """One request on this thread's keep-alive connection: (status, body)."""
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
        data = body if body is None or isinstance(body, str) else json.dumps(body)
        local.conn.request(method, path, body=data, headers=headers)
        answer = local.conn.getresponse()
        return answer.status, answer.read()

    kubectl = [str(Path(subprocess.run([ROOT / "hack/controlplane.sh", "build"], check=True,
                                       capture_output=True, text=True).stdout.strip()) / "kubectl"),
               "--kubeconfig", str(cp / "kubeconfig")]
    subprocess.run(kubectl + ["apply", "-f", str(ROOT / "crds/webhook-operator.yaml")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(kubectl + ["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"],
                   check=True, stdout=subprocess.DEVNULL)
    time.sleep(2)
    code, text = call("POST", "/api/v1/namespaces",
                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
    assert code < 300, text

    def watch():
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls)
        conn.request("GET", f"{GROUP}?watch=true", headers={"Authorization": f"Bearer {token}"})
        answer = conn.getresponse()
        while answer.read(65536):
            pass
    threading.Thread(target=watch, daemon=True).start()

    def sub(i):
        return f"{GROUP}/sub-{i:05}"

    def create(i):
        return call("POST", GROUP, {
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": f"sub-{i:05}"},
            "spec": {"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
                     "events": ["call_completed"], "atlas": {"campaignId": f"camp-{i}"},
                     "endpointRef": {"name": "orders"}}})

    def finalizer(i):  # as kube's finalizer helper writes it
        return call("PATCH", sub(i), [
            {"op": "test", "path": "/metadata/finalizers", "value": None},
            {"op": "add", "path": "/metadata/finalizers", "value": ["hooks.webhook-operator.dev/upstream"]}],
            "application/json-patch+json")

    def status(i):
        def condition(t):
            return {"type": t, "status": "True", "reason": t, "lastTransitionTime": NOW,
                    "message": "the provider's subscription matches the spec", "observedGeneration": 1}
        applied = {"url": f"https://hooks.example.test/hooks/abcdef/sub-{i:05}",
                   "events": ["call_completed"], "description": f"bench/sub-{i:05}"}
        return {"observedGeneration": 1,
                "conditions": [condition("Ready"), condition("Synced"), condition("EndpointReady")],
                "upstream": {"id": f"wh_{i:08x}", "applied": json.dumps(applied), "lastSyncTime": NOW},
                "events": {"received": 0}}

    def apply_status(i):
        return call("PATCH", f"{sub(i)}/status?fieldManager=webhook-operator&force=true",
                    {"apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
                     "status": status(i)}, "application/apply-patch+yaml")

    def merge_status(i):
        return call("PATCH", f"{sub(i)}/status?fieldManager=webhook-operator", {"status": status(i)},
                    "application/merge-patch+json")

    def secret(i):
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": f"sub-{i:05}-signing",
                             "labels": {"app.kubernetes.io/managed-by": "webhook-operator"}},
                "data": {"signingSecret": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}}

    def apply_secret(i):
        return call("PATCH", f"{SECRETS}/sub-{i:05}-signing?fieldManager=webhook-operator&force=true",
                    secret(i), "application/apply-patch+yaml")

    def create_secret(i):
        return call("POST", f"{SECRETS}?fieldManager=webhook-operator", secret(i))

    def get_secret(i):
        return call("GET", f"{SECRETS}/sub-{i:05}-signing")

    def event(i):
        return call("POST", "/apis/events.k8s.io/v1/namespaces/bench/events", {
            "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": f"sub-{i:05}.e{i}"},
            "eventTime": "2026-12-02T02:00:00.000000Z", "reportingController": "webhook-operator",
            "reportingInstance": "webhook-operator", "action": "Sync", "reason": "Created",
            "note": "created the provider's subscription", "type": "Normal",
            "regarding": {"apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
                          "namespace": "bench", "name": f"sub-{i:05}"}})

    every, half = list(range(N)), N // 2
    phases = [
        ("POST webhooksubscriptions (the user's create)", create, every),
        ("JSON PATCH metadata.finalizers", finalizer, every),
        ("APPLY webhooksubscriptions/status", apply_status, every[:half]),
        ("MERGE PATCH webhooksubscriptions/status (for comparison)", merge_status, every[half:]),
        ("APPLY secrets (for comparison)", apply_secret, every[:half]),
        ("POST secrets", create_secret, every[half:]),
        ("GET secrets", get_secret, every),
        ("POST events", event, every),
    ]
    print(f"| request ({N // 2}–{N} each, 16 at a time) | per second | kube-apiserver CPU ms per request | etcd CPU ms per request |")
    print("|---|---|---|---|")
    for name, request, objects in phases:
        before = {p: cpu_seconds(pid) for p, pid in pids.items()}
        start = time.time()
        with ThreadPoolExecutor(16) as pool:
            for code, text in pool.map(request, objects):
                if code >= 300:
                    sys.exit(f"{name}: {code} {text[:300]}")
        elapsed = time.time() - start
        after = {p: cpu_seconds(pid) for p, pid in pids.items()}
        per = {p: 1000 * (after[p] - before[p]) / len(objects) for p in pids}
        print(f"| {name} | {len(objects) / elapsed:.0f} | {per['apiserver']:.2f} | {per['etcd']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
