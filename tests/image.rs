//! The shipped Dockerfile builds, and its image runs the way the chart runs it.
//!
//! `hack/image.sh build` builds the Dockerfile with buildah (the binaries this test run
//! compiled, on the cached `debian:bookworm-slim` stand-in). The image's root filesystem
//! then runs under `runc` as the image configures it: as its non-root user, with a
//! read-only root filesystem. `--version` answers, the simulators serve from the same image
//! and the CA roots are in place. A Dockerfile that does not build fails this test.

#[path = "common/ports.rs"]
mod ports;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const IMAGE: &str = "localhost/webhook-operator:dev";
/// The base's first build (debootstrap) takes about three minutes; a warm build seconds.
const BUILD_TIMEOUT: &str = "1200";
const RUN_TIMEOUT: &str = "60";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn image_sh() -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(BUILD_TIMEOUT).arg(root().join("hack/image.sh"));
    cmd
}

/// Runs a command to its end; panics with its output unless it succeeded.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn buildah(args: &[&str]) -> String {
    stdout(&run(image_sh().arg("buildah").args(args)))
}

/// A working container of the image, mounted: its root filesystem as a directory.
struct Rootfs {
    container: String,
    path: PathBuf,
}

impl Rootfs {
    fn of(image: &str) -> Rootfs {
        let container = buildah(&["from", "--pull=never", image]);
        let path = PathBuf::from(buildah(&["mount", &container]));
        Rootfs { container, path }
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = image_sh()
            .args(["buildah", "rm", &self.container])
            .stdout(Stdio::null())
            .status();
    }
}

/// A runc container of the root filesystem, run as the image's user with the root read-only.
/// It shares the host's network namespace, so a server in it listens on this loopback.
struct Runc {
    state: tempfile::TempDir,
    bundle: tempfile::TempDir,
    id: String,
}

impl Runc {
    fn new(rootfs: &Path, user: (u32, u32), env: &[String], args: &[&str]) -> Runc {
        let bundle = tempfile::tempdir().unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": { "uid": user.0, "gid": user.1 },
                "args": args,
                "env": env,
                "cwd": "/",
                "noNewPrivileges": true,
                "capabilities": { "bounding": [], "effective": [], "permitted": [] },
            },
            "root": { "path": rootfs, "readonly": true },
            "hostname": "image-test",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
                { "destination": "/sys", "type": "sysfs", "source": "sysfs",
                  "options": ["nosuid", "noexec", "nodev", "ro"] },
            ],
            "linux": {
                "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                                { "type": "mount" } ],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
            },
        });
        std::fs::write(
            bundle.path().join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap(),
        )
        .unwrap();
        Runc {
            state: tempfile::tempdir().unwrap(),
            bundle,
            id: format!("webhook-operator-image-test-{}", std::process::id()),
        }
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg(RUN_TIMEOUT)
            .arg(sbin_tool("runc"))
            .arg("--root")
            .arg(self.state.path());
        cmd
    }

    fn command(&self) -> Command {
        let mut cmd = self.runc();
        cmd.args(["run", "--bundle"])
            .arg(self.bundle.path())
            .arg(&self.id);
        cmd
    }

    /// The container's init process as the host sees it.
    fn pid(&self) -> u32 {
        let state: Value =
            serde_json::from_str(&stdout(&run(self.runc().args(["state", &self.id])))).unwrap();
        state["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = self
            .runc()
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// A tool from PATH, or from /usr/sbin, which a non-login PATH may lack (Debian's runc).
fn sbin_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (hack/setup.sh installs it)"))
}

fn image_config() -> Value {
    let inspect: Value = serde_json::from_str(&buildah(&["inspect", "--type", "image", IMAGE]))
        .expect("buildah inspect prints JSON");
    inspect["OCIv1"]["config"].clone()
}

fn uid_gid(user: &str) -> (u32, u32) {
    assert!(
        !user.is_empty(),
        "the image sets no USER: it would run as root"
    );
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let parse = |s: &str| {
        s.parse::<u32>().unwrap_or_else(|_| {
            panic!("the image's USER is numeric, so a pod's runAsNonRoot can check it: {user:?}")
        })
    };
    (parse(uid), parse(gid))
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn kill_and_wait(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn dockerfile_builds_an_image_that_runs_as_non_root_on_a_read_only_root() {
    // The binaries this test run built: the script packages them and runs no cargo of its
    // own, so the image holds exactly what this run compiled and tested.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_webhook-operator"))
        .parent()
        .unwrap();
    let started = Instant::now();
    let built = run(image_sh().arg("build").arg("--bin-dir").arg(bin_dir));
    let build_time = started.elapsed();
    let archive = PathBuf::from(stdout(&built));
    let cache = std::env::var_os("WEBHOOK_OPERATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
                .join("webhook-operator")
        });
    assert_eq!(
        archive,
        cache.join("images/webhook-operator-dev.oci.tar"),
        "hack/image.sh build prints the archive's path, where the cluster harness loads it"
    );
    let archive_size = std::fs::metadata(&archive).expect("the OCI archive").len();

    let config = image_config();
    let user = config["User"].as_str().unwrap_or("");
    let (uid, gid) = uid_gid(user);
    assert_ne!(uid, 0, "the image runs as a non-root user");
    assert_eq!(
        (uid, gid),
        (65532, 65532),
        "the chart's securityContext expects 65532"
    );
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/local/bin/webhook-operator"]),
        "the operator is the entrypoint"
    );
    let env: Vec<String> = config["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();

    let rootfs = Rootfs::of(IMAGE);
    let bundle = rootfs.path.join("etc/ssl/certs/ca-certificates.crt");
    let roots = std::fs::read_to_string(&bundle)
        .map(|pem| pem.matches("-----BEGIN CERTIFICATE-----").count())
        .unwrap_or(0);
    assert!(roots >= 100, "CA roots at {bundle:?}: {roots} certificates");
    let image_size = du(&rootfs.path);

    // `--version`, as the image's user on a read-only root.
    let version = Runc::new(
        &rootfs.path,
        (uid, gid),
        &env,
        &["/usr/local/bin/webhook-operator", "--version"],
    );
    let out = run(&mut version.command());
    assert_eq!(
        stdout(&out),
        format!("webhook-operator {}", env!("CARGO_PKG_VERSION"))
    );
    drop(version);

    // The provider simulators serve from the same image, the same way.
    let port = ports::free_port();
    let listen = format!("127.0.0.1:{port}");
    let sandbox = Runc::new(
        &rootfs.path,
        (uid, gid),
        &env,
        &[
            "/usr/local/bin/webhook-operator",
            "sandbox",
            "--listen",
            &listen,
        ],
    );
    let mut child = sandbox
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let response = loop {
        match http_get(port, "/_control/atlas/subscriptions") {
            Ok(response) => break response,
            Err(e) if Instant::now() > deadline => {
                kill_and_wait(&mut child);
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).ok();
                panic!("the sandbox in the image never listened on {listen}: {e}\n{err}");
            }
            Err(_) => {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    child.stderr.take().unwrap().read_to_string(&mut err).ok();
                    panic!("the sandbox in the image exited ({status}):\n{err}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let process_uid = std::fs::read_to_string(format!("/proc/{}/status", sandbox.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next().map(String::from))
        .unwrap();
    kill_and_wait(&mut child);
    drop(sandbox);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "the sandbox answers: {response}"
    );
    assert_eq!(
        process_uid,
        uid.to_string(),
        "the server ran as the image's user"
    );

    println!(
        "image {IMAGE}: built in {:.1} s; root filesystem {:.1} MiB; OCI archive {:.1} MiB; \
         user {user}; {roots} CA roots; `--version`: {}",
        build_time.as_secs_f64(),
        image_size as f64 / 1048576.0,
        archive_size as f64 / 1048576.0,
        stdout(&out)
    );
}

/// The bytes of the regular files under a directory (the image's unpacked size).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += du(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}
