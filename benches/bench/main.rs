//! The operator's benchmark (issues 7 and 17): the delivery path against nginx and the
//! consumer alone, latency at half load, the same with JetStream, and reconcile at scale against a real API server. Prints a table
//! and writes it, with the machine, the versions and the command, into `BENCHMARKS.md`
//! between the `bench:begin` / `bench:end` markers (the analysis around them is kept).
//!
//! ```text
//! cargo bench --bench bench                 # full run (30 s per phase, 10,000 subscriptions)
//! cargo bench --bench bench -- --smoke      # CI: 2 s per phase, 50 subscriptions
//! ```
//! Flags: `--smoke`, `--seconds N`, `--concurrency N`, `--subscriptions N`,
//! `--only delivery|queue|reconcile|backlog|pace`, `--out FILE`. `BENCH_SMOKE=1` is the same as `--smoke`.
//! `BENCH_PLANE_WRAPPER="valgrind --tool=callgrind"` (or any command that takes the
//! program and its arguments) runs the delivery phases' data-plane process under it.
//! Smoke runs write `target/BENCHMARKS.smoke.md` unless `--out` says otherwise.

/// A general-purpose allocator that keeps small, short-lived allocations (one request,
/// one event) off the system allocator's locks; see BENCHMARKS.md. Its processes set
/// memory up (`src/allocator.rs`) first thing, as the operator binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backlog;
mod commits;
mod delivery;
mod pace;
mod proc_stats;
mod queue;
mod reconcile;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

/// `/proc/loadavg` at start: the machine is shared, and the figures depend on it.
static LOADAVG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

struct Opts {
    smoke: bool,
    seconds: u64,
    concurrency: usize,
    subscriptions: usize,
    delivery: bool,
    queue: bool,
    reconcile: bool,
    backlog: bool,
    pace: bool,
    out: PathBuf,
    args: Vec<String>,
}

fn opts() -> anyhow::Result<Opts> {
    // cargo passes `--bench`; `cargo test` runs this binary without it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let smoke = args.iter().any(|a| a == "--smoke")
        || std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        smoke,
        seconds: if smoke { 2 } else { 30 },
        concurrency: 64,
        subscriptions: if smoke { 50 } else { 10_000 },
        delivery: true,
        queue: true,
        reconcile: true,
        backlog: true,
        pace: true,
        out: if smoke {
            root.join("target/BENCHMARKS.smoke.md")
        } else {
            root.join("BENCHMARKS.md")
        },
        args: args.clone(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--smoke" => {}
            "--seconds" => o.seconds = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--subscriptions" => o.subscriptions = value()?.parse()?,
            "--out" => o.out = value()?.into(),
            "--only" => {
                let only = value()?;
                o.delivery = only == "delivery";
                o.queue = only == "queue";
                o.reconcile = only == "reconcile";
                o.backlog = only == "backlog";
                o.pace = only == "pace";
                if !(o.delivery || o.queue || o.reconcile || o.backlog || o.pace) {
                    anyhow::bail!("--only delivery|queue|reconcile|backlog|pace, not {only}");
                }
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "- machine: {cores} cores available (nproc), {cpu}, {:.1} GiB memory\n\
         - load average when the run started (1/5/15 min; other work shares the machine): {}\n\
         - kernel: {}\n\
         - rustc: {}\n\
         - webhook-operator {} (git {}), {}\n",
        mem_kib / 1024.0 / 1024.0,
        LOADAVG.get().map_or("unknown", String::as_str),
        read("/proc/sys/kernel/osrelease").trim(),
        command_output("rustc", &["-V"]),
        env!("CARGO_PKG_VERSION"),
        command_output(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD"
            ]
        ),
        if cfg!(debug_assertions) {
            "dev profile (unoptimised: its figures mean nothing)"
        } else {
            "release profile (`lto = \"fat\"`, `codegen-units = 1`)"
        },
    )
}

fn mark(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn report(
    o: &Opts,
    d: Option<&delivery::DeliveryResults>,
    q: Option<&queue::QueueResults>,
    r: Option<&reconcile::ReconcileResults>,
    b: Option<&backlog::BacklogResults>,
    p: Option<&pace::PaceResults>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "Generated by `cargo bench --bench bench{}{}` on {} (UTC, unix time {}).\n",
        if o.args.is_empty() { "" } else { " -- " },
        o.args.join(" "),
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M"),
        jiff::Timestamp::now().as_second(),
    );
    s.push_str(&machine());
    if let Some(r) = r {
        let _ = writeln!(s, "- kube-apiserver: {}", r.apiserver_version);
    }
    s.push('\n');
    if let Some(d) = d {
        d.report(&mut s);
    }
    if let Some(q) = q {
        q.report(&mut s);
    }
    if let Some(r) = r {
        r.report(&mut s);
    }
    if let Some(b) = b {
        backlog_report(&mut s, b);
    }
    if let Some(p) = p {
        p.report(&mut s);
    }
    let _ = writeln!(s, "{END}");
    s
}

fn backlog_report(s: &mut String, b: &backlog::BacklogResults) {
    let _ = writeln!(
        s,
        "### Restart with a backlog (embedded queue, 1 KiB events, a tenth dead-lettered; reopened in a child process)\n"
    );
    let _ = writeln!(
        s,
        "| stored events | file MiB | fill s | start to first lease s | peak RSS MiB | counted after reopen |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &b.rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} | {:.2} | {:.1} | {} |",
            r.events, r.file_mib, r.fill_seconds, r.serving_seconds, r.rss_peak_mib, r.counted
        );
    }
    let _ = writeln!(s, "\n| target | measured | |\n|---|---|---|");
    if let Some(big) = b.rows.iter().max_by_key(|r| r.events) {
        let _ = writeln!(
            s,
            "| serving within seconds after a restart with {} events | {:.2} s | {} |",
            big.events,
            big.serving_seconds,
            mark(big.serving_seconds <= 5.0)
        );
        let _ = writeln!(
            s,
            "| peak RSS inside the chart's 256 MiB limit | {:.1} MiB | {} |",
            big.rss_peak_mib,
            mark(big.rss_peak_mib > 0.0 && big.rss_peak_mib <= 256.0)
        );
    }
    s.push('\n');
}

/// Replaces the generated block of `path` (or appends one), keeping the rest.
fn write_report(path: &std::path::Path, block: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{}{}", &old[..b], block.trim_end(), &old[e + END.len()..])
        }
        _ if old.is_empty() => format!("# Benchmarks\n\n{block}"),
        _ => format!("{}\n\n{block}", old.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Every process of the benchmark (the data plane's children too) uses memory as the
    // operator binary does: no transparent huge pages, freed memory returned.
    webhook_operator::allocator::set_up();
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == backlog::CHILD_FLAG) {
        let path = argv.get(i + 1).map(String::as_str).unwrap_or_default();
        return backlog::child(path);
    }
    if let Some(i) = argv.iter().position(|a| a == delivery::PLANE_CHILD_FLAG) {
        return delivery::plane_child(&argv[i + 1..]);
    }
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("BENCH_SMOKE").is_none() {
        // `cargo test --all-targets` runs bench binaries without `--bench`: not a test.
        println!("benchmark: run it with `cargo bench --bench bench`");
        return Ok(());
    }
    let o = opts()?;
    let load = read("/proc/loadavg");
    let _ = LOADAVG.set(
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The rate per slice shows decay over a phase.
    let slice = Duration::from_secs(if o.smoke { 1 } else { 5 });
    let (d, q, r, b, p) = rt.block_on(async {
        let d = if o.delivery {
            let timing = delivery::Timing {
                duration: Duration::from_secs(o.seconds),
                slice,
            };
            Some(delivery::run(o.concurrency, timing).await?)
        } else {
            None
        };
        let q = if o.queue {
            Some(queue::run(Duration::from_secs(o.seconds), slice).await?)
        } else {
            None
        };
        let r = if o.reconcile {
            let (settle, timeout) = if o.smoke {
                (Duration::from_secs(2), Duration::from_secs(60))
            } else {
                (Duration::from_secs(5), Duration::from_secs(180))
            };
            Some(reconcile::run(o.subscriptions, settle, timeout).await?)
        } else {
            None
        };
        let b = if o.backlog {
            let sizes: &[u64] = if o.smoke {
                &[10_000]
            } else {
                &[100_000, 1_000_000]
            };
            Some(backlog::run(sizes).await?)
        } else {
            None
        };
        let p = if o.pace {
            Some(pace::run(if o.smoke { 2 } else { o.seconds.min(20) }).await?)
        } else {
            None
        };
        anyhow::Ok((d, q, r, b, p))
    })?;
    let block = report(
        &o,
        d.as_ref(),
        q.as_ref(),
        r.as_ref(),
        b.as_ref(),
        p.as_ref(),
    );
    println!("{block}");
    write_report(&o.out, &block)?;
    eprintln!("bench: wrote {}", o.out.display());
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
