"""Drives the Smallest simulator with the official Smallest Python SDK (`smallestai`).

Run by tests/smallest_sdk.rs: `python smallest_sdk.py <atoms base URL> <api key>`.
Every answer is checked against the SDK's own types, strictly (pydantic validation, and
no field the SDK does not declare), so where the simulator and the SDK disagree this
fails. Exit status 0 = conformant; the first failure is printed with its step.
"""

import sys

from smallestai import SmallestAI
from smallestai.atoms.errors import BadRequestError, UnauthorizedError
from smallestai.atoms.types.webhook import Webhook
from smallestai.atoms.types.webhook_subscription import WebhookSubscription
from smallestai.atoms.types.webhook_subscription_populated import WebhookSubscriptionPopulated
from smallestai.atoms.webhooks import CreateWebhooksRequestEventsItem
from smallestai.environment import SmallestAIEnvironment

BASE, KEY = sys.argv[1], sys.argv[2]
AGENT_A = "60d0fe4f5311236168a109ca"
AGENT_B = "60d0fe4f5311236168a109cb"
HOOK = "https://hooks.example/sdk/conformance"


def client(key):
    env = SmallestAIEnvironment(atoms=BASE, waves=BASE, waves_ws=BASE, payment=BASE)
    return SmallestAI(api_key=key, environment=env, max_retries=0, timeout=10)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def declared(model):
    return {f.alias or name for name, f in model.model_fields.items()}


def strict(model, raw, what):
    """Validates `raw` as the SDK's `model` and refuses fields the SDK does not know."""
    check(isinstance(raw, dict), f"{what}: expected an object, got {raw!r}")
    unknown = set(raw) - declared(model)
    check(not unknown, f"{what}: fields the SDK does not declare: {sorted(unknown)}")
    return model.model_validate(raw)


def envelope(http_response, what):
    # The raw JSON, not the SDK's lenient parse: every field is then checked strictly.
    # `_response` is the SDK's httpx response (stable in the pinned version).
    body = http_response._response.json()
    check(body.get("status") is True, f"{what}: status is not true: {body}")
    return body["data"]


def step(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report every failure with its step
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        sys.exit(1)
    print(f"ok   {name}")


sdk = client(KEY).atoms.webhooks
raw = sdk.with_raw_response
state = {}


def create():
    events = [
        CreateWebhooksRequestEventsItem(agent_id=AGENT_A, event_type="pre-conversation"),
        CreateWebhooksRequestEventsItem(agent_id=AGENT_A, event_type="post-conversation"),
        CreateWebhooksRequestEventsItem(agent_id=AGENT_B, event_type="analytics-completed"),
    ]
    r = raw.create(endpoint=HOOK, description="sdk conformance", events=events)
    check(r.status_code == 201, f"create answered {r.status_code}")
    wid = envelope(r, "create")
    check(isinstance(wid, str) and len(wid) == 24, f"create data is not an ObjectId: {wid!r}")
    state["id"] = wid
    dup = None
    try:
        sdk.create(endpoint=HOOK, description="again", events=events)
    except BadRequestError as e:
        dup = e
    check(dup is not None, "a second create with the same URL must be a 400")


def list_all():
    data = envelope(raw.get_webhooks(), "list")
    check(isinstance(data, list), "list data is not an array")
    hooks = [strict(Webhook, h, "list item") for h in data]
    ours = [h for h in hooks if h.url == HOOK]
    check(len(ours) == 1, f"list has {len(ours)} webhooks with our URL")
    w = ours[0]
    check(w.id == state["id"], "list id differs from the created id")
    check(w.status == "enabled", f"status {w.status!r}")
    # The SDK documents the secret on the list as well as on get-by-id.
    check(bool(w.decrypted_secret_key), "list item lacks decryptedSecretKey")
    for s in data[[h["_id"] for h in data].index(state["id"])]["subscriptions"]:
        strict(WebhookSubscriptionPopulated, s, "webhook subscription")
    pairs = sorted((s.agent_id.id, s.event_type) for s in w.subscriptions)
    check(
        pairs
        == [
            (AGENT_A, "post-conversation"),
            (AGENT_A, "pre-conversation"),
            (AGENT_B, "analytics-completed"),
        ],
        f"subscriptions {pairs}",
    )
    state["secret"] = w.decrypted_secret_key


def get_by_id():
    data = envelope(raw.get_webhooks(webhook_id=state["id"]), "get by id")
    w = strict(Webhook, data, "get by id")
    check(w.id == state["id"], "get by id returned another webhook")
    check(w.decrypted_secret_key == state["secret"], "decryptedSecretKey differs from the list")
    bad = None
    try:
        sdk.get_webhooks(webhook_id="not-an-object-id")
    except BadRequestError as e:
        bad = e
    check(bad is not None, "a malformed id must be a 400")


def update():
    r = raw.update(state["id"], description="sdk conformance v2", headers={"X-Env": "test"})
    check(envelope(r, "update") == state["id"], "update data is not the webhook id")
    w = strict(Webhook, envelope(raw.get_webhooks(webhook_id=state["id"]), "get"), "get")
    check(w.description == "sdk conformance v2", f"description {w.description!r}")
    r = raw.update(state["id"], headers={})
    check(envelope(r, "update") == state["id"], "clearing headers failed")


def agent_subscriptions():
    data = envelope(raw.get_webhook_subscriptions_for_an_agent(AGENT_A), "agent get")
    subs = [strict(WebhookSubscription, s, "agent subscription") for s in data]
    types = sorted(s.event_type for s in subs if s.webhook_id == state["id"])
    check(types == ["post-conversation", "pre-conversation"], f"agent A has {types}")
    check(all(s.agent_id == AGENT_A for s in subs), "agentId is not the agent's id")

    r = raw.replace_webhook_subscriptions_for_an_agent(
        AGENT_A, event_types=["analytics-completed"], webhook_id=state["id"]
    )
    check(r.status_code in (200, 201), f"replace answered {r.status_code}")
    check(isinstance(envelope(r, "agent replace"), str), "replace data is not a message")
    data = envelope(raw.get_webhook_subscriptions_for_an_agent(AGENT_A), "agent get")
    types = [s["eventType"] for s in data if s["webhookId"] == state["id"]]
    check(types == ["analytics-completed"], f"after replace agent A has {types}")


def delete():
    busy = None
    try:
        sdk.delete(state["id"])
    except BadRequestError as e:
        busy = e
    check(busy is not None, "deleting a webhook agents still use must be a 400")
    check("assigned to one or more agents" in str(busy.body), f"400 body {busy.body}")
    for agent in (AGENT_A, AGENT_B):
        r = raw.delete_webhook_subscriptions_for_an_agent(agent)
        check(isinstance(envelope(r, "agent delete"), str), "agent delete data is not a message")
        left = envelope(raw.get_webhook_subscriptions_for_an_agent(agent), "agent get")
        check(left == [], f"agent {agent} still has {left}")
    r = raw.delete(state["id"])
    check(isinstance(envelope(r, "delete"), str), "delete data is not a message")
    ids = [h["_id"] for h in envelope(raw.get_webhooks(), "list")]
    check(state["id"] not in ids, "the webhook is still listed")


def wrong_key():
    refused = None
    try:
        client("wrong-key").atoms.webhooks.get_webhooks()
    except UnauthorizedError as e:
        refused = e
    check(refused is not None, "a wrong key must be a 401")


for name, fn in [
    ("create with events", create),
    ("list", list_all),
    ("get by id (decryptedSecretKey)", get_by_id),
    ("update", update),
    ("agent subscriptions get/replace", agent_subscriptions),
    ("agent subscriptions delete, webhook delete", delete),
    ("wrong key", wrong_key),
]:
    step(name, fn)
print("conformant")
