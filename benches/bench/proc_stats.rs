//! What `/proc` says about a process: its peak resident set and the CPU time it used.

/// Peak RSS (VmHWM) in MiB of the process whose `/proc/PID/status` text this is.
pub fn vm_hwm_mib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak RSS (VmHWM) in MiB of a running process.
pub fn vm_hwm_mib_of(pid: u32) -> Option<f64> {
    vm_hwm_mib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// CPU seconds (user + system, all threads) a running process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds a running process and its children (nginx's workers under its master)
/// have used so far.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let own = cpu_seconds(pid)?;
    let children: f64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|child| std::fs::read_to_string(format!("/proc/{child}/stat")).ok())
        .filter(|stat| parent_of(stat) == Some(pid))
        .filter_map(|stat| cpu_seconds_of(&stat))
        .sum();
    Some(own + children)
}

/// The parent's pid from a `/proc/PID/stat` line (field 4).
fn parent_of(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15; the command name, field
/// 2, is in parentheses and may hold spaces, so count from the last `)`).
fn cpu_seconds_of(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// The machine's busy and total CPU seconds so far, summed over all cores (`/proc/stat`).
pub fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0.0);
    let hz = clock_ticks_per_second();
    Some(((total - idle) / hz, total / hz))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The CPU seconds named processes, and the machine as a whole, used between two readings.
pub struct CpuReading {
    parts: Vec<(&'static str, u32, f64)>,
    machine: (f64, f64),
}

impl CpuReading {
    pub fn now(parts: &[(&'static str, u32)]) -> Self {
        CpuReading {
            parts: parts
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_seconds(pid).unwrap_or(f64::NAN)))
                .collect(),
            machine: machine_cpu_seconds().unwrap_or((f64::NAN, f64::NAN)),
        }
    }

    /// What was used since `self`, as `name s, …; machine busy B of C s`.
    pub fn used_since(&self) -> String {
        let now = CpuReading::now(
            &self
                .parts
                .iter()
                .map(|&(name, pid, _)| (name, pid))
                .collect::<Vec<_>>(),
        );
        let parts: Vec<String> = self
            .parts
            .iter()
            .zip(&now.parts)
            .map(|((name, _, before), (_, _, after))| format!("{name} {:.1} s", after - before))
            .collect();
        format!(
            "{}; the machine busy {:.1} of {:.1} CPU s",
            parts.join(", "),
            now.machine.0 - self.machine.0,
            now.machine.1 - self.machine.1
        )
    }
}
