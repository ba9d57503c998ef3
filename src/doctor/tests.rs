//! Unit tests of the doctor checks: controlled host facts, exact verdicts and fixes.

use std::path::PathBuf;

use super::host::{DataDir, DirAccess, Filesystem, Limit, Refusal, TlsFile};
use super::{checks, diagnose, Host, Report, Verdict};
use crate::config::Config;

/// A host on which the small config below passes every check.
fn healthy() -> Host {
    Host {
        kernel_release: "6.1.0-18-amd64".into(),
        io_uring: Ok(()),
        io_uring_disabled: Some(0),
        fd_limit: Limit { soft: 65_536, hard: 65_536 },
        memlock_limit: Limit { soft: 8 << 20, hard: 8 << 20 },
        somaxconn: Some(4096),
        file_max: Some(1 << 20),
        nr_open: Some(1 << 20),
        local_ports: Some((32_768, 60_999)),
        cpus_allowed: vec![0, 1, 2, 3],
        parallelism: 4,
        data_dir: None,
        tls_files: Vec::new(),
        redis: None,
    }
}

/// Four shards of 10 000 connections and one webhook endpoint, parsed from TOML like a user's.
fn config(extra: &str) -> Config {
    let text = format!(
        "[server]\nshards = 4\nconnections_per_shard_max = 10000\n{extra}\n[[apps]]\nid = \"1\"\nkey = \"k\"\n\
         secret = \"s\"\n[[apps.webhooks]]\nurl = \"http://example.com/hook\"\nformat = \"pusher\"\n"
    );
    Config::from_toml(&text).unwrap()
}

/// The finding of `name` for `config` on `host`: its verdict, and `fragment` in its fix.
fn check(config: &Config, host: &Host, name: &str, verdict: Verdict, fragment: &str) {
    let report = diagnose(config, host);
    let finding = report.checks.iter().find(|f| f.check == name).unwrap_or_else(|| panic!("no check {name}"));
    assert_eq!(finding.verdict, verdict, "{finding:?}");
    let fix = finding.fix.as_deref().unwrap_or("");
    assert!(fix.contains(fragment), "fix of {name} lacks {fragment:?}: {finding:?}");
}

/// A healthy host passes every check with exit 0.
#[test]
fn healthy_host_is_all_ok() {
    let report = diagnose(&config(""), &healthy());
    assert_eq!(report.not_ok().count(), 0, "{}", report.to_text());
    assert_eq!(report.exit_code, 0);
    let names: Vec<&str> = report.checks.iter().map(|f| f.check).collect();
    assert_eq!(
        names,
        [
            "io_uring",
            "memlock",
            "fd_limit",
            "file_max",
            "somaxconn",
            "local_ports",
            "cpus",
            "data_dir",
            "tls_files",
            "redis"
        ]
    );
}

/// The descriptor arithmetic: connections × shards + webhook connections + WAL + per-shard and
/// process descriptors.
#[test]
fn fd_need_counts_every_descriptor() {
    let mut host = healthy();
    host.data_dir = Some(DataDir {
        path: "/var/lib/ringwire".into(),
        access: DirAccess::Writable,
        filesystem: Filesystem::Other(0xEF53),
    });
    let shards = 4;
    let webhooks = shards * 4; // one endpoint, connections_per_endpoint_max = 4
    let expected = shards * 10_000
        + webhooks
        + shards * checks::WAL_FDS_PER_SHARD
        + shards * checks::SHARD_FDS
        + checks::PROCESS_FDS;
    assert_eq!(checks::fd_need(&config(""), &host), expected);
    // `memory` durability writes no WAL; cluster mode adds two Redis links per shard.
    let memory = config("[webhooks]\ndurability = \"memory\"\n");
    assert_eq!(checks::fd_need(&memory, &host), expected - shards * checks::WAL_FDS_PER_SHARD);
    // `shards = 0` means one per available CPU, as the server counts them.
    host.parallelism = 2;
    assert_eq!(checks::shards(&with_shards(config(""), 0), &host), 2);
}

/// `config` with `server.shards` replaced.
fn with_shards(mut config: Config, shards: usize) -> Config {
    config.server.shards = shards;
    config
}

/// An open-file limit below the need is a problem whose fix is the LimitNOFILE line; a low
/// hard limit and a low fs.nr_open are named too.
#[test]
fn fd_limit_below_need() {
    let mut host = healthy();
    host.fd_limit = Limit { soft: 1024, hard: 524_288 };
    check(&config(""), &host, "fd_limit", Verdict::Problem, "LimitNOFILE=40960");
    check(&config(""), &host, "fd_limit", Verdict::Problem, "ulimit -n 40960");
    host.fd_limit = Limit { soft: 1024, hard: 4096 };
    check(&config(""), &host, "fd_limit", Verdict::Problem, "the hard limit is 4096");
    host.nr_open = Some(32_768);
    check(&config(""), &host, "fd_limit", Verdict::Problem, "fs.nr_open=40960");
    check(&config(""), &host, "file_max", Verdict::Problem, "sysctl -w fs.nr_open=40960");
    host.fd_limit = Limit { soft: u64::MAX, hard: u64::MAX };
    host.nr_open = Some(1 << 20);
    check(&config(""), &host, "fd_limit", Verdict::Ok, "");
}

/// fs.file-max below the need is a warning with its sysctl line.
#[test]
fn file_max_below_need() {
    let mut host = healthy();
    host.file_max = Some(20_000);
    check(&config(""), &host, "file_max", Verdict::Warning, "sysctl -w fs.file-max=");
}

/// A backlog above somaxconn is a warning naming both sysctls.
#[test]
fn somaxconn_below_backlog() {
    let mut host = healthy();
    host.somaxconn = Some(128);
    check(&config(""), &host, "somaxconn", Verdict::Warning, "sysctl -w net.core.somaxconn=1024");
    host.somaxconn = None;
    check(&config(""), &host, "somaxconn", Verdict::Ok, "");
}

/// io_uring refused: a warning under `auto` (epoll fallback), a problem under `io_uring`,
/// nothing under `epoll`; the fix follows the cause.
#[test]
fn io_uring_refusals() {
    let mut host = healthy();
    host.io_uring = Err(Refusal { errno: Some(libc::EPERM), message: "Operation not permitted".into() });
    check(&config(""), &host, "io_uring", Verdict::Warning, "SystemCallFilter=io_uring_setup");
    let strict = config("io_driver = \"io_uring\"\n");
    check(&strict, &host, "io_uring", Verdict::Problem, "SystemCallFilter=");
    check(&config("io_driver = \"epoll\"\n"), &host, "io_uring", Verdict::Ok, "");
    host.io_uring_disabled = Some(2);
    check(&config(""), &host, "io_uring", Verdict::Warning, "sysctl -w kernel.io_uring_disabled=0");
    host.io_uring_disabled = Some(1);
    check(&config(""), &host, "io_uring", Verdict::Warning, "kernel.io_uring_group");
    host.io_uring_disabled = None;
    host.io_uring = Err(Refusal { errno: Some(libc::ENOSYS), message: "Function not implemented".into() });
    check(&config(""), &host, "io_uring", Verdict::Warning, "Linux 5.6+");
    host.io_uring = Err(Refusal { errno: Some(libc::ENOMEM), message: "Cannot allocate memory".into() });
    check(&config(""), &host, "io_uring", Verdict::Warning, "LimitMEMLOCK=");
}

/// Memlock matters only before 5.12, and only when io_uring may be used.
#[test]
fn memlock_on_old_kernels() {
    let mut host = healthy();
    host.kernel_release = "5.10.0-28-amd64".into();
    host.memlock_limit = Limit { soft: 64 << 10, hard: 64 << 10 };
    check(&config(""), &host, "memlock", Verdict::Warning, "LimitMEMLOCK=524288");
    check(&config("io_driver = \"io_uring\"\n"), &host, "memlock", Verdict::Problem, "ulimit -l 512");
    check(&config("io_driver = \"epoll\"\n"), &host, "memlock", Verdict::Ok, "");
    host.kernel_release = "5.12.0".into();
    check(&config(""), &host, "memlock", Verdict::Ok, "");
    assert!(checks::kernel_at_least("6.1.0-18-amd64", (5, 12)));
    assert!(!checks::kernel_at_least("5.4.0", (5, 12)));
    assert!(!checks::kernel_at_least("garbage", (5, 12)));
}

/// Outbound connections against the local port range: over half is a warning, over all a problem.
#[test]
fn local_ports_against_webhook_connections() {
    let mut host = healthy();
    let wide = config("[webhooks]\nconnections_per_endpoint_max = 1000\n");
    host.local_ports = Some((60_000, 60_999));
    check(&wide, &host, "local_ports", Verdict::Problem, "ip_local_port_range=\"1024 65535\"");
    host.local_ports = Some((56_000, 61_999));
    check(&wide, &host, "local_ports", Verdict::Warning, "ip_local_port_range");
    host.local_ports = Some((32_768, 60_999));
    check(&wide, &host, "local_ports", Verdict::Ok, "");
}

/// More shards than allowed CPUs is a warning; a cpuset that does not start at CPU 0 is fine
/// (shards pin to the CPUs in it).
#[test]
fn shards_against_the_cpuset() {
    let mut host = healthy();
    host.cpus_allowed = vec![0, 1];
    host.parallelism = 2;
    check(&config(""), &host, "cpus", Verdict::Warning, "server.shards = 0");
    check(&with_shards(config(""), 0), &host, "cpus", Verdict::Ok, "");
    host.cpus_allowed = vec![2, 3];
    check(&with_shards(config(""), 2), &host, "cpus", Verdict::Ok, "");
}

/// The data directory: unusable is a problem, tmpfs or overlay under disk durability a
/// warning, and none of it matters with `memory` durability or without webhooks.
#[test]
fn data_dir_verdicts() {
    let mut host = healthy();
    let dir = |access, filesystem| Some(DataDir { path: "/data".into(), access, filesystem });
    host.data_dir = dir(DirAccess::Unusable { reason: "cannot create a file in /data".into() }, Filesystem::Unknown);
    check(&config(""), &host, "data_dir", Verdict::Problem, "StateDirectory=ringwire");
    host.data_dir = dir(DirAccess::Writable, Filesystem::Tmpfs);
    check(&config(""), &host, "data_dir", Verdict::Warning, "disk filesystem");
    check(&config("[webhooks]\ndurability = \"batch\"\n"), &host, "data_dir", Verdict::Warning, "");
    host.data_dir = dir(DirAccess::Creatable { ancestor: "/".into() }, Filesystem::Overlay);
    check(&config(""), &host, "data_dir", Verdict::Warning, "container volume");
    host.data_dir = dir(DirAccess::Creatable { ancestor: "/".into() }, Filesystem::Other(0xEF53));
    check(&config(""), &host, "data_dir", Verdict::Ok, "");
    // Gathering decides whether the directory is used at all.
    assert!(super::host::data_dir_in_use(&config("")));
    assert!(!super::host::data_dir_in_use(&config("[webhooks]\ndurability = \"memory\"\n")));
    assert!(!super::host::data_dir_in_use(&Config::embedded_default()));
}

/// An unreadable TLS file is a problem naming its key; the config's TLS files are listed by
/// the hook the listener's `[tls]` will extend.
#[test]
fn tls_files_must_be_readable() {
    let mut host = healthy();
    host.tls_files = vec![TlsFile {
        key: "webhooks.ca_file",
        path: PathBuf::from("/etc/ringwire/ca.pem"),
        readable: Err("Permission denied (os error 13)".into()),
    }];
    check(&config(""), &host, "tls_files", Verdict::Problem, "chmod 640");
    host.tls_files[0].readable = Ok(1200);
    check(&config(""), &host, "tls_files", Verdict::Ok, "");
    let mut with_ca = config("");
    with_ca.webhooks.ca_file = Some("/etc/ringwire/ca.pem".into());
    assert_eq!(super::host::tls_files(&with_ca), [("webhooks.ca_file", PathBuf::from("/etc/ringwire/ca.pem"))]);
}

/// A configured Redis that refuses the connection is a problem; unset, the check is ok.
#[test]
fn redis_link() {
    let mut host = healthy();
    let mut cluster = config("");
    cluster.cluster.redis_url = Some("redis://10.0.0.5:6379".into());
    host.redis = Some(Err("cannot connect to 10.0.0.5:6379: Connection refused".into()));
    check(&cluster, &host, "redis", Verdict::Problem, "start Redis");
    host.redis = Some(Ok("10.0.0.5:6379".parse().unwrap()));
    check(&cluster, &host, "redis", Verdict::Ok, "");
    check(&config(""), &healthy(), "redis", Verdict::Ok, "");
}

/// Exit status: 0 all ok, 1 with warnings, 2 with any problem; the JSON carries the same.
#[test]
fn exit_codes_and_json() {
    let mut host = healthy();
    host.somaxconn = Some(128);
    let warned = diagnose(&config(""), &host);
    assert_eq!((warned.verdict, warned.exit_code), (Verdict::Warning, 1));
    host.fd_limit = Limit { soft: 256, hard: 256 };
    let report = diagnose(&config(""), &host);
    assert_eq!((report.verdict, report.exit_code), (Verdict::Problem, 2));
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["exit_code"], 2);
    assert_eq!(json["verdict"], "problem");
    let fd = json["checks"].as_array().unwrap().iter().find(|c| c["check"] == "fd_limit").unwrap();
    assert_eq!(fd["verdict"], "problem");
    assert!(fd["fix"].as_str().unwrap().contains("LimitNOFILE="));
    assert_eq!(Report::new(Vec::new()).exit_code, 0);
    let text = report.to_text();
    assert!(text.contains("PROBLEM  fd_limit") && text.contains("fix: LimitNOFILE="), "{text}");
    assert!(text.ends_with("1 problem(s), 1 warning(s): exit 2\n"), "{text}");
}
