//! Running a command a test needs to succeed.

use std::process::{Command, Output};

/// Runs `cmd` to completion (panicking with `spawn` when it cannot start) and asserts that
/// it succeeded, with `failed` followed by its stderr as the message. Returns its output.
pub fn output_ok(cmd: &mut Command, spawn: &str, failed: &str) -> Output {
    let out = cmd.output().expect(spawn);
    assert!(
        out.status.success(),
        "{failed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `program` with `args`, its stdout piped, killed when dropped.
pub fn spawn_piped(program: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs")
}
