//! `ringwire doctor` on this real host under controlled conditions (a lowered open-file limit,
//! a backlog over somaxconn, unusable and tmpfs data directories, more shards than CPUs, a
//! reachable and an unreachable Redis): verdicts, exit codes, JSON and the start-up log.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use ringwire::config::{Config, IoDriver};
use ringwire::server::Driver;
use ringwire::Server;
use serde_json::Value;

use crate::support::temp_dir;

/// A config every check passes on an ordinary Linux host: one shard, few connections, epoll
/// (so the verdict does not depend on io_uring here), a backlog under any somaxconn.
const BASE: &str = "[server]\nbind = \"127.0.0.1:0\"\nshards = 1\nio_driver = \"epoll\"\nbacklog = 128\n\
                    connections_per_shard_max = 1000\n";

/// An app with one webhook endpoint, so the data directory is in use.
const WEBHOOK_APP: &str = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n[[apps.webhooks]]\n\
                           url = \"http://example.com/hook\"\nformat = \"pusher\"\n";

/// Runs `ringwire doctor --json` on `config` (TOML), with the open-file limit set to `nofile`;
/// returns the exit status and the verdict of each check.
fn doctor(config: &str, nofile: u64) -> (i32, BTreeMap<String, String>, Value) {
    let dir = temp_dir("doctor");
    let path = dir.join("ringwire.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringwire"));
    command.arg("doctor").arg("--config").arg(&path).arg("--json");
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit,
    // which is async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let output = command.output().unwrap();
    let json: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let verdicts = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["check"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string()))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    (output.status.code().unwrap(), verdicts, json)
}

/// The checks whose verdict is not ok.
fn not_ok(verdicts: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    verdicts.iter().filter(|(_, v)| *v != "ok").map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn only(check: &str, verdict: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(check.to_string(), verdict.to_string())])
}

/// The fix of `check` in a JSON report.
fn fix<'a>(json: &'a Value, check: &str) -> &'a str {
    let finding = json["checks"].as_array().unwrap().iter().find(|c| c["check"] == check).unwrap();
    finding["fix"].as_str().unwrap_or("")
}

/// The host's open-file hard limit: the most a test may give the child.
fn fd_hard_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into `limit`, which lives for the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_max
}

/// The baseline config passes every check (exit 0) with 4096 open files allowed, and an
/// open-file limit of 256 turns fd_limit alone into a problem (exit 2) with its LimitNOFILE fix.
#[test]
fn lowered_fd_limit_is_a_problem() {
    let (code, verdicts, _) = doctor(BASE, fd_hard_limit().min(4096));
    assert_eq!((code, not_ok(&verdicts)), (0, BTreeMap::new()));
    let (code, verdicts, json) = doctor(BASE, 256);
    assert_eq!((code, not_ok(&verdicts)), (2, only("fd_limit", "problem")));
    // 1000 connections + 8 per shard + 64 for the process = 1072, rounded up to 2048.
    assert!(fix(&json, "fd_limit").starts_with("LimitNOFILE=2048 in the unit"), "{json}");
    assert_eq!(json["exit_code"], 2);
}

/// A backlog one above net.core.somaxconn is a warning (exit 1) naming the sysctl line.
#[test]
fn backlog_above_somaxconn_is_a_warning() {
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let config = BASE.replace("backlog = 128", &format!("backlog = {}", somaxconn + 1));
    let (code, verdicts, json) = doctor(&config, 4096.min(fd_hard_limit()));
    assert_eq!((code, not_ok(&verdicts)), (1, only("somaxconn", "warning")));
    assert!(fix(&json, "somaxconn").starts_with(&format!("sysctl -w net.core.somaxconn={}", somaxconn + 1)));
}

/// A data directory that cannot be written (it exists but refuses new files even to root, or
/// its parent is a regular file) is a problem (exit 2); a creatable one is fine.
#[test]
fn unwritable_data_dir_is_a_problem() {
    let nofile = 4096.min(fd_hard_limit());
    let file = temp_dir("doctor-file").join("plain-file");
    std::fs::write(&file, b"").unwrap();
    // /proc/1 is a directory in which nobody, root included, can create a file.
    for data_dir in ["/proc/1".to_string(), format!("{}/data", file.display())] {
        let config = format!("{BASE}[webhooks]\ndata_dir = \"{data_dir}\"\n{WEBHOOK_APP}");
        let (code, verdicts, json) = doctor(&config, nofile);
        assert_eq!((code, not_ok(&verdicts)), (2, only("data_dir", "problem")), "{data_dir}: {json}");
    }
    // Under the target directory, a disk in any build (a /tmp on tmpfs would warn).
    let fresh =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("doctor-fresh-{}/not-yet", std::process::id()));
    let config = format!("{BASE}[webhooks]\ndata_dir = \"{}\"\n{WEBHOOK_APP}", fresh.display());
    let (code, verdicts, _) = doctor(&config, nofile);
    assert_eq!((code, not_ok(&verdicts)), (0, BTreeMap::new()));
    assert!(!fresh.exists(), "doctor must not create the data directory");
}

/// A tmpfs data directory (/dev/shm) is a warning (exit 1) under fsync durability and fine
/// under memory durability, which writes nothing.
#[test]
fn tmpfs_data_dir_with_fsync_is_a_warning() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    if !mounts.lines().any(|line| line.split_whitespace().nth(1) == Some("/dev/shm") && line.contains(" tmpfs ")) {
        eprintln!("skipped: /dev/shm is not a tmpfs on this host");
        return;
    }
    let dir = format!("/dev/shm/ringwire-doctor-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let nofile = 4096.min(fd_hard_limit());
    let config = format!("{BASE}[webhooks]\ndata_dir = \"{dir}\"\ndurability = \"fsync\"\n{WEBHOOK_APP}");
    let (code, verdicts, json) = doctor(&config, nofile);
    assert_eq!((code, not_ok(&verdicts)), (1, only("data_dir", "warning")), "{json}");
    let memory = config.replace("\"fsync\"", "\"memory\"");
    let (code, verdicts, _) = doctor(&memory, nofile);
    assert_eq!((code, not_ok(&verdicts)), (0, BTreeMap::new()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One shard more than the CPUs this process may use is a warning (exit 1).
#[test]
fn shards_above_cpus_is_a_warning() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let config = BASE.replace("shards = 1", &format!("shards = {}", cpus + 1));
    let (code, verdicts, json) = doctor(&config, 4096.min(fd_hard_limit()));
    assert_eq!((code, not_ok(&verdicts)), (1, only("cpus", "warning")), "{json}");
    assert!(fix(&json, "cpus").contains("server.shards = 0"));
}

/// Without --json the report is text: one line per check, the fix under a failed one.
#[test]
fn text_report() {
    let dir = temp_dir("doctor-text");
    let path = dir.join("ringwire.toml");
    std::fs::write(&path, BASE).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringwire"));
    command.args(["doctor", "--config"]).arg(&path);
    // SAFETY: as in `doctor`: only the async-signal-safe setrlimit runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let output = command.output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("PROBLEM  fd_limit    open-file limit 256 < 1 shard(s)"), "{text}");
    assert!(text.contains("fix: LimitNOFILE=2048 in the unit"), "{text}");
    assert!(text.contains("ok       somaxconn"), "{text}");
    assert!(text.ends_with("1 problem(s), 0 warning(s): exit 2\n"), "{text}");
}

/// cluster.redis_url: a listening address passes, a closed port is a problem.
#[test]
fn redis_reachability() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nofile = 4096.min(fd_hard_limit());
    let with_redis = |addr| format!("{BASE}[cluster]\nredis_url = \"redis://{addr}\"\n");
    let (code, verdicts, _) = doctor(&with_redis(open), nofile);
    assert_eq!((code, not_ok(&verdicts)), (0, BTreeMap::new()));
    let (code, verdicts, json) = doctor(&with_redis(closed), nofile);
    assert_eq!((code, not_ok(&verdicts)), (2, only("redis", "problem")), "{json}");
}

/// Doctor's io_uring verdict predicts the driver `io_driver = "auto"` really ends up on.
#[test]
fn io_uring_verdict_matches_the_driver_auto_picks() {
    let mut config = Config::embedded_default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.server.shards = 1;
    config.server.io_driver = IoDriver::Auto;
    let predicted = ringwire::doctor::Host::gather(&config).io_uring.is_ok();
    let server = Server::start(config).unwrap();
    assert_eq!(server.drivers[0] == Driver::IoUring, predicted, "{:?}", server.drivers);
    server.shutdown();
    server.join();
}

/// At start the server logs each check that is not ok, once, with its fix.
#[test]
fn startup_logs_findings_once() {
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let dir = temp_dir("doctor-start");
    let path = dir.join("ringwire.toml");
    std::fs::write(&path, BASE.replace("backlog = 128", &format!("backlog = {}", somaxconn + 1))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringwire"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("ringwire listening on"), "{first}");
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<&str> = stderr.lines().filter(|line| line.contains("somaxconn")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("WARN") && lines[0].contains(&format!("sysctl -w net.core.somaxconn={}", somaxconn + 1)));
}

/// The embedded default config (a first start, no file) logs a host problem as a warning, not
/// an error, while a config file of the user's logs it as an error: here, an open-file limit
/// below what the default's connection limits need.
#[test]
fn embedded_default_warns_instead_of_erroring() {
    let run = |config: Option<&std::path::Path>| {
        let config = config.map(|p| format!(" --config {}", p.display())).unwrap_or_default();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n 1024 && exec {}{config}", env!("CARGO_BIN_EXE_ringwire")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        child.wait().unwrap();
        assert!(
            first.starts_with("ringwire listening on"),
            "did not start (is 127.0.0.1:6001 taken?): {first}\n{stderr}"
        );
        stderr.lines().find(|line| line.contains("open-file limit")).map(str::to_string).unwrap_or_default()
    };
    let embedded = run(None);
    assert!(embedded.contains("WARN") && !embedded.contains("ERROR"), "{embedded}");
    let dir = temp_dir("doctor-user-config");
    let path = dir.join("ringwire.toml");
    std::fs::write(&path, "[server]\nbind = \"127.0.0.1:0\"\n").unwrap();
    let user = run(Some(&path));
    assert!(user.contains("ERROR"), "{user}");
}
