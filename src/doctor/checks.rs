//! The checks: pure functions of the config and the host facts, each returning one finding
//! whose fix is the exact line to apply.
//!
//! Never touches the host (that is `doctor::host`), so every verdict is unit-tested with
//! controlled facts.

use super::host::{DataDir, DirAccess, Filesystem, Host, Limit};
use super::{Finding, Verdict};
use crate::config::{Config, DurabilityMode, IoDriver};

/// Descriptors the process holds besides sockets and WAL files: stdio, the signal pipe, the
/// DNS and blocking-pool threads' sockets and eventfds, the log.
pub const PROCESS_FDS: u64 = 64;
/// Descriptors per shard besides its connections: the listener, the io_uring ring, the
/// eventfds that wake it, with room to spare.
pub const SHARD_FDS: u64 = 8;
/// Descriptors per shard for its write-ahead log: the open segment, its directory, and a
/// segment being compacted.
pub const WAL_FDS_PER_SHARD: u64 = 4;
/// Redis connections per shard in cluster mode: a command link and a subscription link
/// (docs/cluster.md).
pub const REDIS_LINKS_PER_SHARD: u64 = 2;
/// Locked memory one shard's io_uring needs on kernels that charge it to `RLIMIT_MEMLOCK`
/// (before 5.12): 1024 submission entries of 64 bytes, 2048 completions of 16 bytes and the
/// ring headers, rounded up to pages with room to spare.
pub const RING_MEMLOCK_BYTES: u64 = 128 << 10;

/// Every check, in report order.
pub fn all(config: &Config, host: &Host) -> Vec<Finding> {
    vec![
        io_uring(config, host),
        memlock(config, host),
        fd_limit(config, host),
        file_max(config, host),
        somaxconn(config, host),
        local_ports(config, host),
        cpus(config, host),
        data_dir(config, host),
        tls_files(host),
        redis(config, host),
    ]
}

/// Shards the server will start on this host: `server.shards`, or one per available CPU.
pub fn shards(config: &Config, host: &Host) -> u64 {
    match config.server.shards {
        0 => host.parallelism.max(1) as u64,
        n => n as u64,
    }
}

/// Outbound connections the node may hold: webhook keep-alive connections on every shard,
/// and the Redis links in cluster mode.
pub fn outbound_connections(config: &Config, host: &Host) -> u64 {
    let endpoints = config.apps.iter().map(|app| app.webhooks.len() as u64).sum::<u64>();
    let webhooks = endpoints * config.webhooks.connections_per_endpoint_max as u64;
    let redis = if config.cluster.redis_url.is_some() { REDIS_LINKS_PER_SHARD } else { 0 };
    shards(config, host) * (webhooks + redis)
}

/// Descriptors the config may need at its limits: every shard full of connections, every
/// outbound connection open, the WAL files, and the process's own.
pub fn fd_need(config: &Config, host: &Host) -> u64 {
    let shards = shards(config, host);
    let inbound = shards * config.server.connections_per_shard_max as u64;
    let wal = match super::host::data_dir_in_use(config) {
        true => shards * WAL_FDS_PER_SHARD,
        false => 0,
    };
    inbound + outbound_connections(config, host) + wal + shards * SHARD_FDS + PROCESS_FDS
}

/// Whether io_uring works, and which driver `io_driver` ends up on.
pub fn io_uring(config: &Config, host: &Host) -> Finding {
    let driver = config.server.io_driver;
    let refusal = match (&host.io_uring, driver) {
        (Ok(()), IoDriver::Epoll) => {
            return Finding::ok("io_uring", "available, but server.io_driver = \"epoll\" does not use it".into())
        }
        (Ok(()), _) => {
            return Finding::ok("io_uring", format!("available: io_driver = {} uses io_uring", name(driver)))
        }
        (Err(refusal), _) => refusal,
    };
    let why = format!("io_uring_setup fails: {}", refusal.message);
    let fix = io_uring_fix(host, refusal.errno);
    match driver {
        IoDriver::Epoll => Finding::ok("io_uring", format!("{why}; server.io_driver = \"epoll\" does not need it")),
        IoDriver::Auto => Finding::with_fix(
            "io_uring",
            Verdict::Warning,
            format!("{why}; io_driver = \"auto\" will fall back to epoll (slower)"),
            fix,
        ),
        IoDriver::IoUring => Finding::with_fix(
            "io_uring",
            Verdict::Problem,
            format!("{why}; io_driver = \"io_uring\" refuses to start"),
            fix,
        ),
    }
}

/// The fix for a refused io_uring, by what refused it.
fn io_uring_fix(host: &Host, errno: Option<i32>) -> String {
    const SYSCTL: &str = "persist it in /etc/sysctl.d/60-ringwire.conf";
    match (host.io_uring_disabled, errno) {
        (Some(2), _) => format!("sysctl -w kernel.io_uring_disabled=0 ({SYSCTL})"),
        (Some(1), _) => format!(
            "kernel.io_uring_disabled = 1 allows only the group kernel.io_uring_group: sysctl -w \
             kernel.io_uring_group=<gid of the ringwire user>, or kernel.io_uring_disabled=0 ({SYSCTL})"
        ),
        (_, Some(libc::EPERM)) => "a seccomp filter refuses io_uring_setup: in a systemd unit remove \
             SystemCallFilter= or add SystemCallFilter=io_uring_setup io_uring_enter io_uring_register; in a \
             container run with a seccomp profile that allows those three system calls"
            .into(),
        (_, Some(libc::ENOSYS)) => {
            format!("kernel {} has no io_uring (it needs Linux 5.6+ built with CONFIG_IO_URING)", host.kernel_release)
        }
        (_, Some(libc::ENOMEM)) => format!(
            "raise the locked-memory limit to at least {} KiB per shard: LimitMEMLOCK= in the unit, or ulimit -l",
            RING_MEMLOCK_BYTES >> 10
        ),
        _ => "set server.io_driver = \"epoll\" to start without io_uring".into(),
    }
}

/// Locked memory, which io_uring needs only on kernels before 5.12.
pub fn memlock(config: &Config, host: &Host) -> Finding {
    let check = "memlock";
    if config.server.io_driver == IoDriver::Epoll {
        return Finding::ok(check, "not needed: server.io_driver = \"epoll\"".into());
    }
    if kernel_at_least(&host.kernel_release, (5, 12)) {
        return Finding::ok(
            check,
            format!("not needed: kernel {} charges io_uring memory to the cgroup (5.12+)", host.kernel_release),
        );
    }
    let need = shards(config, host) * RING_MEMLOCK_BYTES;
    if host.memlock_limit.soft >= need {
        return Finding::ok(
            check,
            format!("{} KiB locked memory allowed, io_uring needs {}", kib(host.memlock_limit.soft), need >> 10),
        );
    }
    let verdict = match config.server.io_driver {
        IoDriver::IoUring => Verdict::Problem,
        _ => Verdict::Warning,
    };
    Finding::with_fix(
        check,
        verdict,
        format!(
            "kernel {} charges io_uring rings to RLIMIT_MEMLOCK: {} KiB allowed, {} KiB needed; io_uring may be refused",
            host.kernel_release,
            kib(host.memlock_limit.soft),
            need >> 10
        ),
        format!("LimitMEMLOCK={need} in the unit, or ulimit -l {}", need.div_ceil(1024)),
    )
}

/// The open-file limit against every descriptor the config may need.
pub fn fd_limit(config: &Config, host: &Host) -> Finding {
    let need = fd_need(config, host);
    let Limit { soft, hard } = host.fd_limit;
    let summary = format!(
        "{} shard(s) × connections_per_shard_max {} + {} outbound + WAL and process files = {need}",
        shards(config, host),
        config.server.connections_per_shard_max,
        outbound_connections(config, host)
    );
    if soft >= need {
        return Finding::ok("fd_limit", format!("open-file limit {} ≥ {summary}", show(soft)));
    }
    let target = need.next_multiple_of(1024);
    let shards = shards(config, host);
    let other = need - shards * config.server.connections_per_shard_max as u64;
    let mut fix = format!(
        "LimitNOFILE={target} in the unit (systemd), or ulimit -n {target} before starting; or lower \
         server.connections_per_shard_max to {}",
        soft.saturating_sub(other) / shards
    );
    if hard < target {
        fix.push_str(&format!(" (the hard limit is {}: raise it too, as root)", show(hard)));
    }
    if host.nr_open.is_some_and(|nr_open| nr_open < target) {
        fix.push_str(&format!("; first sysctl -w fs.nr_open={target}, see the file_max check"));
    }
    Finding::with_fix(
        "fd_limit",
        Verdict::Problem,
        format!("open-file limit {} < {summary}: connections past it fail with EMFILE", show(soft)),
        fix,
    )
}

/// `fs.nr_open` (the ceiling of any process's open-file limit) and `fs.file-max` (the
/// system's open files) against the descriptors the config may need.
pub fn file_max(config: &Config, host: &Host) -> Finding {
    let need = fd_need(config, host);
    let target = need.next_multiple_of(1024);
    const PERSIST: &str = "persist it in /etc/sysctl.d/60-ringwire.conf";
    if let Some(nr_open) = host.nr_open.filter(|&n| n < need) {
        return Finding::with_fix(
            "file_max",
            Verdict::Problem,
            format!("fs.nr_open = {nr_open} < {need} descriptors needed: no open-file limit can be set that high"),
            format!("sysctl -w fs.nr_open={target} ({PERSIST}), or lower server.connections_per_shard_max"),
        );
    }
    if let Some(file_max) = host.file_max.filter(|&n| n < need) {
        return Finding::with_fix(
            "file_max",
            Verdict::Warning,
            format!("fs.file-max = {file_max} < {need}: the whole system runs out of open files first"),
            format!("sysctl -w fs.file-max={} ({PERSIST})", target * 2),
        );
    }
    let shown = |v: Option<u64>| v.map_or("unknown".to_string(), show);
    Finding::ok(
        "file_max",
        format!("fs.nr_open = {}, fs.file-max = {} ≥ {need}", shown(host.nr_open), shown(host.file_max)),
    )
}

/// `net.core.somaxconn` caps every listen backlog without an error.
pub fn somaxconn(config: &Config, host: &Host) -> Finding {
    let backlog = u64::from(config.server.backlog);
    match host.somaxconn {
        Some(cap) if cap < backlog => Finding::with_fix(
            "somaxconn",
            Verdict::Warning,
            format!(
                "net.core.somaxconn = {cap} < server.backlog = {backlog}: the kernel silently caps each shard's \
                 accept queue at {cap}, so connection bursts are dropped sooner"
            ),
            format!(
                "sysctl -w net.core.somaxconn={backlog} and net.ipv4.tcp_max_syn_backlog={backlog} (persist both in \
                 /etc/sysctl.d/60-ringwire.conf), or set server.backlog = {cap}"
            ),
        ),
        Some(cap) => Finding::ok("somaxconn", format!("net.core.somaxconn = {cap} ≥ server.backlog = {backlog}")),
        None => Finding::ok("somaxconn", "net.core.somaxconn is not readable; not checked".into()),
    }
}

/// The local port range against the node's outbound connections: all connections to one
/// endpoint (one address and port) draw from this range.
pub fn local_ports(config: &Config, host: &Host) -> Finding {
    let outbound = outbound_connections(config, host);
    let Some((low, high)) = host.local_ports else {
        return Finding::ok("local_ports", "net.ipv4.ip_local_port_range is not readable; not checked".into());
    };
    let ports = u64::from(high.saturating_sub(low)) + 1;
    let fix = "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\" (persist it in /etc/sysctl.d/60-ringwire.conf), \
               or lower webhooks.connections_per_endpoint_max"
        .to_string();
    let message =
        format!("{outbound} outbound connection(s) (webhooks, Redis) over {ports} local ports ({low}-{high})");
    // Closed connections hold their port in TIME_WAIT for a minute, and other processes share
    // the range: more than half of it for ringwire alone leaves no headroom for churn.
    match outbound {
        n if n > ports => {
            Finding::with_fix("local_ports", Verdict::Problem, format!("{message}: not enough ports"), fix)
        }
        n if n > ports / 2 => Finding::with_fix(
            "local_ports",
            Verdict::Warning,
            format!("{message}: over half the range, reconnect churn (TIME_WAIT) can exhaust it"),
            fix,
        ),
        _ => Finding::ok("local_ports", message),
    }
}

/// Shards against the CPUs this process may run on.
pub fn cpus(config: &Config, host: &Host) -> Finding {
    let shards = shards(config, host);
    let allowed = host.cpus_allowed.len() as u64;
    let list = cpu_list(&host.cpus_allowed);
    if allowed > 0 && shards > allowed {
        return Finding::with_fix(
            "cpus",
            Verdict::Warning,
            format!(
                "server.shards = {shards} but this process may run on {allowed} CPU(s) ({list}): shards share cores \
                 and stall each other"
            ),
            format!(
                "set server.shards = 0 (one per CPU) or at most {allowed}, or allow more CPUs (CPUAffinity= in the \
                 unit, docker --cpuset-cpus)"
            ),
        );
    }
    Finding::ok("cpus", format!("{shards} shard(s) on {allowed} allowed CPU(s) ({list})"))
}

/// The webhook data directory: usable, and on a filesystem that keeps what fdatasync promises.
pub fn data_dir(config: &Config, host: &Host) -> Finding {
    let Some(DataDir { path, access, filesystem }) = &host.data_dir else {
        let why = match config.webhooks.durability {
            DurabilityMode::Memory => "webhooks.durability = \"memory\"",
            _ => "no app has webhooks",
        };
        return Finding::ok("data_dir", format!("not used: {why}"));
    };
    let shown = path.display();
    if let DirAccess::Unusable { reason } = access {
        return Finding::with_fix(
            "data_dir",
            Verdict::Problem,
            format!("webhooks.data_dir {shown} is not usable ({reason}): webhook shards fail to start"),
            "chown the directory to the service user (or its parent, to create it), or point webhooks.data_dir at a \
             writable disk; the packaged unit provides /var/lib/ringwire (StateDirectory=ringwire)"
                .into(),
        );
    }
    let kind = match filesystem {
        Filesystem::Tmpfs => Some("tmpfs: fdatasync returns at once and a reboot loses everything"),
        Filesystem::Overlay => Some("overlayfs: a container's writable layer, gone with the container"),
        Filesystem::Other(_) | Filesystem::Unknown => None,
    };
    let mode = config.webhooks.durability;
    if let (Some(kind), DurabilityMode::Fsync | DurabilityMode::Batch) = (kind, mode) {
        return Finding::with_fix(
            "data_dir",
            Verdict::Warning,
            format!(
                "webhooks.data_dir {shown} is on {kind}; webhooks.durability = {} promises more",
                if mode == DurabilityMode::Fsync { "\"fsync\"" } else { "\"batch\"" }
            ),
            "put webhooks.data_dir on a disk filesystem (ext4, xfs) or a container volume".into(),
        );
    }
    match access {
        DirAccess::Creatable { ancestor } => {
            Finding::ok("data_dir", format!("{shown} will be created (under {}, writable)", ancestor.display()))
        }
        _ => Finding::ok("data_dir", format!("{shown} is writable")),
    }
}

/// The TLS files the config names (today `webhooks.ca_file`; the listener's certificate and
/// key once `[tls]` lands, through `host::tls_files`).
pub fn tls_files(host: &Host) -> Finding {
    if host.tls_files.is_empty() {
        return Finding::ok("tls_files", "none configured".into());
    }
    for file in &host.tls_files {
        if let Err(reason) = &file.readable {
            return Finding::with_fix(
                "tls_files",
                Verdict::Problem,
                format!("{} = {} cannot be read: {reason}", file.key, file.path.display()),
                format!("make {} readable by the service user (chgrp ringwire; chmod 640)", file.path.display()),
            );
        }
    }
    let names: Vec<String> = host.tls_files.iter().map(|f| format!("{} = {}", f.key, f.path.display())).collect();
    Finding::ok("tls_files", format!("readable: {}", names.join(", ")))
}

/// The Redis link in cluster mode: its address accepts a TCP connection.
pub fn redis(config: &Config, host: &Host) -> Finding {
    match (&host.redis, &config.cluster.redis_url) {
        (None, _) | (_, None) => Finding::ok("redis", "cluster mode off (cluster.redis_url unset)".into()),
        (Some(Ok(address)), Some(_)) => {
            Finding::ok("redis", format!("cluster.redis_url: {address} accepts connections"))
        }
        (Some(Err(reason)), Some(_)) => Finding::with_fix(
            "redis",
            Verdict::Problem,
            format!("cluster.redis_url: {reason}"),
            "start Redis or fix cluster.redis_url; check firewalls between this node and Redis".into(),
        ),
    }
}

/// Whether a release like `5.10.0-28-amd64` is at least `(major, minor)`; an unreadable
/// release counts as old, so the check errs towards warning.
pub fn kernel_at_least(release: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

fn name(driver: IoDriver) -> &'static str {
    match driver {
        IoDriver::Auto => "\"auto\"",
        IoDriver::IoUring => "\"io_uring\"",
        IoDriver::Epoll => "\"epoll\"",
    }
}

fn show(value: u64) -> String {
    match value {
        u64::MAX => "unlimited".into(),
        n => n.to_string(),
    }
}

fn kib(bytes: u64) -> String {
    match bytes {
        u64::MAX => "unlimited".into(),
        n => (n >> 10).to_string(),
    }
}

/// `0-3,6` style, as in /proc/self/status.
fn cpu_list(cpus: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == cpu => *end = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    let parts: Vec<String> =
        ranges.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    if parts.is_empty() {
        "unknown".into()
    } else {
        parts.join(",")
    }
}
