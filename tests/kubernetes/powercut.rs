//! Power cuts under load. The operator's data directory is on lazyfs
//! (`tests/powercut/lazyfs`, a FUSE file system in the manner of Jepsen's LazyFS): every
//! write to any file of it that no fsync/fdatasync covered yet is dropped at a "power
//! cut". The operator is killed at a random moment while events stream in, the cut drops
//! what was not synced, and the next run must still deliver every event that was answered
//! 2xx. SIGKILL alone keeps the page cache; this is what makes the journal's sync count.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::delivery_e2e::{
    OperatorProcess, atlas_event, call_ids, consumer_destination, ingress_url, send_json,
    setup_with,
};
use crate::fixtures::*;
use crate::ports::free_port;
use crate::process::output_ok;
use crate::support::wait_until;

/// Power cuts, each at a random moment under load.
const CUTS: usize = 3;

/// Builds lazyfs with the Go toolchain (modules from the module cache or the proxy).
fn build_lazyfs() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/lazyfs");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lazyfs");
    output_ok(
        Command::new("go")
            .args(["build", "-mod=readonly", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src),
        "run go build (Go is a prerequisite, see hack/setup.sh)",
        "go build lazyfs: ",
    );
    out
}

/// One mount of lazyfs; a power cut ends it.
struct Lazyfs {
    child: Child,
    mountpoint: PathBuf,
}

impl Lazyfs {
    fn mount(bin: &Path, backing: &Path, mountpoint: &Path) -> Lazyfs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the power-cut test needs FUSE"
        );
        let mut child = Command::new(bin)
            .arg(backing)
            .arg(mountpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lazyfs");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert_eq!(first.trim(), "mounted", "lazyfs did not mount");
        Lazyfs {
            child,
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    /// The power cut: every unsynced write is dropped, then the mount goes away. Returns
    /// lazyfs's report (how many writes it dropped).
    fn cut(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-USR1", &pid])
                .status()
                .unwrap()
                .success()
        );
        let mut report = String::new();
        BufReader::new(self.child.stdout.take().unwrap())
            .read_line(&mut report)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "lazyfs exited with {status}");
        report.trim().to_string()
    }
}

impl Drop for Lazyfs {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Sends events as fast as four clients can until the ingress stops answering; records
/// the ids answered 2xx.
async fn load(url: String, prefix: String, accepted: Arc<Mutex<BTreeSet<String>>>) {
    let clients = (0..4).map(|c| {
        let (url, prefix, accepted) = (url.clone(), prefix.clone(), accepted.clone());
        async move {
            let http = reqwest::Client::new();
            for n in 0.. {
                let id = format!("{prefix}-{c}-{n}");
                match http.post(&url).json(&atlas_event(&id)).send().await {
                    Ok(r) if r.status().is_success() => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    futures::future::join_all(clients).await;
}

#[tokio::test]
async fn power_cuts_under_load_lose_no_acknowledged_event() {
    let lazyfs = build_lazyfs();
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    // The consumer refuses while the cuts come, so every acknowledged event is still in
    // the queue at a cut (retried every second or two, never dead-lettered), and accepts
    // in the last run. The first run only sets things up (on an ordinary directory).
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"maxAttempts": 100, "initialDelay": "1s", "maxDelay": "2s"}}});
    let (env, sandbox, consumer, operator, _dir, _) = setup_with("powercut", spec, &[]).await;
    consumer.answer(503);
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    let path = url::Url::parse(&ingress_url(&env, "orders").await)
        .unwrap()
        .path()
        .to_string();
    drop(operator);

    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let mut reports = Vec::new();
    for cut in 0..=CUTS {
        let fs = Lazyfs::mount(&lazyfs, backing.path(), mountpoint.path());
        let port = free_port();
        let mut operator =
            OperatorProcess::start_with(&env, &sandbox, &consumer, port, mountpoint.path(), &[]);
        let url = format!("http://127.0.0.1:{port}{path}/atlas");
        let probe = format!("probe-{cut}");
        wait_until(Duration::from_secs(60), "the ingress answers", || {
            let (url, probe) = (url.clone(), probe.clone());
            async move {
                let r = send_json(&url, &atlas_event(&probe)).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        accepted.lock().unwrap().insert(probe);
        if cut == CUTS {
            // The last run is not cut: everything acknowledged must arrive.
            consumer.answer(200);
            let want = accepted.lock().unwrap().clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            let missing = loop {
                let missing = want.difference(&call_ids(&consumer)).count();
                if missing == 0 || tokio::time::Instant::now() > deadline {
                    break missing;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert_eq!(
                missing,
                0,
                "{missing} of {} acknowledged events were never delivered (120 s after the last restart)",
                want.len()
            );
            drop(operator);
            drop(fs);
            break;
        }
        let before = accepted.lock().unwrap().len();
        let running = tokio::spawn(load(url, format!("c{cut}"), accepted.clone()));
        let at = Duration::from_millis(300 + rand::random::<u64>() % 2200);
        tokio::time::sleep(at).await;
        operator.kill9();
        tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("the load stops once the ingress is gone")
            .unwrap();
        let report = fs.cut();
        let acked = accepted.lock().unwrap().len() - before;
        println!("cut {cut} after {at:?} of load: {acked} events acknowledged; lazyfs {report}");
        reports.push(report);
    }
    let acked = accepted.lock().unwrap().len();
    let delivered = call_ids(&consumer);
    println!(
        "{CUTS} power cuts: {acked} acknowledged events, all among the {} delivered",
        delivered.len()
    );
    // Each cut dropped writes the operator had made and not synced: the test cut
    // something (the queue file's pages are synced only at a checkpoint).
    let dropped: Vec<u64> = reports
        .iter()
        .map(|r| {
            r.strip_prefix("crashed: ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("lazyfs reported {r:?}"))
        })
        .collect();
    assert!(
        dropped.iter().sum::<u64>() > 0,
        "no cut dropped a write: {reports:?}"
    );
}
