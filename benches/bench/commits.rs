//! The embedded queue's group commits over a load window, read from the data plane's own
//! `/metrics` (`webhook_operator_queue_commit_*`, the histograms a user's Prometheus
//! scrapes): how many commits a second, how many operations each carried and how long
//! each took. A closed loop's senders each wait for a commit, so these say, in every run,
//! how much of the loop the queue's writer takes.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

const DURATION: &str = "webhook_operator_queue_commit_duration_seconds";
const OPERATIONS: &str = "webhook_operator_queue_commit_operations";

/// The histograms' running totals at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommitTotals {
    commits: u64,
    seconds: f64,
    operations: f64,
}

/// Reads the totals from the ops server at `metrics`; `None` when it does not answer or
/// exports no commits (a JetStream queue).
pub fn read(metrics: SocketAddr) -> Option<CommitTotals> {
    let mut stream = std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    parse(&text)
}

fn parse(exposition: &str) -> Option<CommitTotals> {
    let sample = |name: &str| {
        let prefix = format!("{name} ");
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(CommitTotals {
        commits: sample(&format!("{DURATION}_count"))? as u64,
        seconds: sample(&format!("{DURATION}_sum"))?,
        operations: sample(&format!("{OPERATIONS}_sum"))?,
    })
}

/// The commits of one window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Commits {
    per_second: f64,
    operations_each: f64,
    mean_ms: f64,
    /// The share of the window the writer spent committing.
    busy: f64,
}

impl Commits {
    pub fn over(before: CommitTotals, after: CommitTotals, window: Duration) -> Option<Self> {
        let commits = after.commits.checked_sub(before.commits)?;
        let secs = window.as_secs_f64();
        (commits > 0 && secs > 0.0).then(|| {
            let spent = after.seconds - before.seconds;
            Commits {
                per_second: commits as f64 / secs,
                operations_each: (after.operations - before.operations) / commits as f64,
                mean_ms: spent * 1e3 / commits as f64,
                busy: spent / secs,
            }
        })
    }
}

impl std::fmt::Display for Commits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} a second carrying {:.1} operations each, {:.2} ms each on average, the \
             writer committing for {:.0} % of the window",
            self.per_second,
            self.operations_each,
            self.mean_ms,
            self.busy * 100.0
        )
    }
}
