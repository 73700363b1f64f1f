//! Step 5: a replay requested through the annotation, handled once per value.

use std::collections::BTreeMap;
use std::time::SystemTime;

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::problem::EndpointProblem;
use crate::api::endpoint::{WebhookEndpoint, WebhookEndpointStatus};
use crate::api::{
    REPLAY_ANNOTATION, REPLAY_BY_ANNOTATION, REPLAY_SINCE_ANNOTATION, REPLAY_UNTIL_ANNOTATION,
};
use crate::controller::routes::EndpointKey;
use crate::controller::{Context, publish};
use crate::queue::ReplayFilter;

/// The dead letters a replay request selects, from its annotations. Without a window,
/// all of them; a window applies to the time they were dead-lettered or received.
pub fn replay_filter(
    annotations: &BTreeMap<String, String>,
) -> Result<ReplayFilter, EndpointProblem> {
    let time = |k: &str| -> Result<Option<SystemTime>, EndpointProblem> {
        annotations
            .get(k)
            .map(|s| {
                s.parse::<jiff::Timestamp>()
                    .map(SystemTime::from)
                    .map_err(|_| {
                        EndpointProblem::ReplayInvalid(format!(
                            "annotation {k} must be an RFC 3339 time, got {s:?}"
                        ))
                    })
            })
            .transpose()
    };
    let (since, until) = (
        time(REPLAY_SINCE_ANNOTATION)?,
        time(REPLAY_UNTIL_ANNOTATION)?,
    );
    let by = annotations.get(REPLAY_BY_ANNOTATION).map(String::as_str);
    if !matches!(by, None | Some("dead-lettered") | Some("received")) {
        return Err(EndpointProblem::ReplayInvalid(format!(
            "annotation {REPLAY_BY_ANNOTATION} must be dead-lettered or received"
        )));
    }
    if since.is_none() && until.is_none() {
        return Ok(ReplayFilter::All);
    }
    let from = since.unwrap_or(std::time::UNIX_EPOCH);
    let to = until.unwrap_or_else(SystemTime::now);
    Ok(match by {
        Some("received") => ReplayFilter::ReceivedBetween { from, to },
        _ => ReplayFilter::DeadLetteredBetween { from, to },
    })
}

/// Handles a new replay request; returns the last handled request value for status.
pub async fn replay(
    ep: &WebhookEndpoint,
    ctx: &Context,
    key: &EndpointKey,
    current: &WebhookEndpointStatus,
) -> Option<String> {
    let replay_at = ep.annotations().get(REPLAY_ANNOTATION).cloned();
    // Remembered in memory too: the cached object may predate our own status write, and a
    // request must be handled once.
    let last_replay = ctx
        .memos
        .endpoints
        .read(key, |m| m.handled_replay.clone())
        .or_else(|| current.last_handled_replay_at.clone());
    if replay_at.is_none() || replay_at == last_replay {
        return last_replay;
    }
    let result = match replay_filter(ep.annotations()) {
        Ok(filter) => ctx.routes.0.replay(key.clone(), filter).await,
        Err(invalid) => {
            // A bad request is answered once; a new request value tries again.
            let (reason, msg) = (invalid.reason(), invalid.message());
            publish(ctx, ep, EventType::Warning, reason, "Replay", msg).await;
            Ok(0)
        }
    };
    match result {
        Ok(n) => {
            let msg = format!("re-queued {n} dead-lettered events");
            publish(ctx, ep, EventType::Normal, "Replayed", "Replay", msg).await;
            if let Some(r) = &replay_at {
                ctx.memos
                    .endpoints
                    .update(key.clone(), |m| m.handled_replay = Some(r.clone()));
            }
            replay_at
        }
        Err(e) => {
            let msg = e.to_string();
            publish(ctx, ep, EventType::Warning, "ReplayFailed", "Replay", msg).await;
            last_replay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_replay_request_selects_by_its_window() {
        let all = replay_filter(&annotations(&[(REPLAY_ANNOTATION, "r1")]));
        assert!(matches!(all, Ok(ReplayFilter::All)));
        let since = "2026-11-25T00:00:00Z";
        let dead = replay_filter(&annotations(&[(REPLAY_SINCE_ANNOTATION, since)]));
        assert!(matches!(dead, Ok(ReplayFilter::DeadLetteredBetween { .. })));
        let received = replay_filter(&annotations(&[
            (REPLAY_SINCE_ANNOTATION, since),
            (REPLAY_BY_ANNOTATION, "received"),
        ]));
        assert!(matches!(received, Ok(ReplayFilter::ReceivedBetween { .. })));
    }

    #[test]
    fn an_invalid_replay_request_is_a_problem_named_replay_invalid() {
        for bad in [
            annotations(&[(REPLAY_UNTIL_ANNOTATION, "yesterday")]),
            annotations(&[(REPLAY_BY_ANNOTATION, "sent")]),
        ] {
            let problem = replay_filter(&bad).expect_err("refused");
            assert_eq!(problem.reason(), "ReplayInvalid");
            assert!(problem.message().starts_with("annotation "), "{problem:?}");
        }
    }
}
