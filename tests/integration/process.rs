//! The binary: config checking, startup output and graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::*;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringwire"))
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ringwire-test-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// check-config accepts the default, and refuses a bad file with exit 2 naming key and line.
#[test]
fn check_config() {
    let good = temp_config("good", ringwire::config::DEFAULT_CONFIG_TOML);
    assert!(binary().args(["check-config", good.to_str().unwrap()]).status().unwrap().success());
    let bad = temp_config("bad", "[server]\nbind = \"127.0.0.1:1\"\nshard = 2\n");
    let output = binary().arg("--check").arg("--config").arg(&bad).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3") && stderr.contains("shard"), "{stderr}");
}

/// SIGTERM: WebSockets get close 4200, readiness turns 503 on an open keep-alive connection,
/// and the process exits 0. The startup lines of a user config name its apps without secrets.
#[test]
fn graceful_shutdown() {
    let config = temp_config(
        "shutdown",
        "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\nshutdown_close_window_ms = 200\nshutdown_grace_ms = 2000\n",
    );
    let mut child = binary().arg("--config").arg(&config).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr: SocketAddr = first.split_whitespace().nth(3).unwrap().parse().unwrap_or_else(|_| panic!("{first}"));
    let mut rest = String::new();
    for _ in 0..2 {
        stdout.read_line(&mut rest).unwrap();
    }
    // A config file was given: the app's id and key are printed, never its secret.
    assert!(rest.contains("app id=1 key=ringwire-demo-key\n"), "{rest}");
    assert!(!rest.contains("secret"), "a user config's app secret must not be printed: {rest}");

    let mut clients: Vec<Ws> = (0..6).map(|_| connect(addr).0).collect();
    let mut keep_alive = TcpStream::connect(addr).unwrap();
    keep_alive.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    keep_alive.write_all(b"GET /ready HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = keep_alive.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));

    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    for ws in &mut clients {
        assert_eq!(recv_close(ws), 4200);
    }
    keep_alive.write_all(b"GET /ready HTTP/1.1\r\n\r\n").unwrap();
    let n = keep_alive.read(&mut buf).unwrap();
    let response = String::from_utf8_lossy(&buf[..n]);
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// CPU seconds used so far by a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A connection flood past the process's descriptor limit: accept fails with EMFILE, the
/// server backs off instead of spinning, and serves again once the flood is gone.
#[test]
fn connection_flood_past_fd_limit() {
    let config = temp_config("flood", "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\nshutdown_grace_ms = 200\n");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 128 && exec {} --config {}", env!("CARGO_BIN_EXE_ringwire"), config.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr: SocketAddr = first.split_whitespace().nth(3).unwrap().parse().unwrap();
    let flood: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(child.id()) - before;
    assert!(used < 0.5, "server used {used:.2} s of CPU in 2 s while out of descriptors");
    drop(flood);
    std::thread::sleep(Duration::from_millis(500));
    let (mut ws, _) = connect(addr);
    subscribe(&mut ws, "after-flood");
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Starts the binary on a config file; returns the child and the address it printed.
fn start_binary(config: &std::path::Path) -> (std::process::Child, SocketAddr) {
    let mut child = binary().arg("--config").arg(config).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr: SocketAddr = first.split_whitespace().nth(3).unwrap().parse().unwrap_or_else(|_| panic!("{first}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    (child, addr)
}

/// The durability contract: under steady publishing the server is killed with SIGKILL, then
/// restarted on the same data directory; every event the API accepted (answered 200) is
/// delivered at least once. The receiver is down until the kill (so the accepted deliveries
/// are in the WAL, some mid-retry) and then comes up. Prints the duplicate count.
#[test]
fn kill_9_loses_no_accepted_webhook() {
    // A port nobody listens on until after the crash.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let receiver_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data_dir = temp_dir("crash");
    let config = temp_config(
        "crash",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n\n[webhooks]\ndata_dir = {:?}\nallow_private_targets = true\n\
             retry_schedule_ms = [0, 100, 200, 400, 800, 1600]\n\n[[apps]]\nid = \"1\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n\n\
             [[apps.webhooks]]\nurl = \"http://{}/hook\"\nformat = \"standard\"\nsecret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\n",
            data_dir.to_str().unwrap(),
            receiver_addr
        ),
    );
    let (mut child, addr) = start_binary(&config);
    let publisher = std::thread::spawn(move || {
        let mut accepted = Vec::new();
        for n in 0..100_000u64 {
            let (status, _) = publish(addr, &["crash"], "tick", &format!("{{\"n\":{n}}}"), None);
            match status {
                200 => accepted.push(n),
                0 => break, // the server is gone
                other => panic!("publish {n} answered {other}"),
            }
        }
        accepted
    });
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let accepted = publisher.join().unwrap();
    assert!(accepted.len() > 50, "the publisher got going ({} accepted)", accepted.len());
    let receiver = Receiver::start_on(&receiver_addr.to_string());
    let (mut child, _) = start_binary(&config);
    let numbers = |requests: &[Received]| -> Vec<u64> {
        requests
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter_map(|b| b["data"]["n"].as_u64())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let delivered: std::collections::HashSet<u64> = numbers(&receiver.requests()).into_iter().collect();
        let missing: Vec<u64> = accepted.iter().copied().filter(|n| !delivered.contains(n)).collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let all = numbers(&receiver.requests());
    let unique: std::collections::HashSet<u64> = all.iter().copied().collect();
    eprintln!(
        "crash test: {} accepted, {} delivered ({} unique), {} duplicates, {} missing",
        accepted.len(),
        all.len(),
        unique.len(),
        all.len() - unique.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "accepted but never delivered: {missing:?}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A client event is accepted when relayed: its lifecycle webhook survives `kill -9` even
/// though its batch was not formed yet (batch_ms is a minute in the first run), and is sent
/// after the restart, signed, exactly as it would have been.
#[test]
fn kill_9_keeps_relayed_client_event_webhooks() {
    let receiver = Receiver::start();
    let data_dir = temp_dir("crash-lifecycle");
    let config_text = |batch_ms: u64| {
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n\n[webhooks]\ndata_dir = {:?}\nallow_private_targets = true\n\
             batch_ms = {batch_ms}\n\n[[apps]]\nid = \"1\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n\n\
             [[apps.webhooks]]\nurl = \"http://{}/pusher\"\nformat = \"pusher\"\nevents = [\"client_event\"]\n",
            data_dir.to_str().unwrap(),
            receiver.addr
        )
    };
    let (mut child, addr) = start_binary(&temp_config("crash-lifecycle-1", &config_text(60_000)));
    let channel = "private-room";
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let join = |ws: &mut Ws, socket_id: &str| {
        let signature = hex::encode(ring::hmac::sign(&key, format!("{socket_id}:{channel}").as_bytes()));
        let auth = format!("{KEY}:{signature}");
        send_json(ws, serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}));
        assert_eq!(recv_json(ws)["event"], "pusher_internal:subscription_succeeded");
    };
    let (mut sender, sender_id) = connect(addr);
    join(&mut sender, &sender_id);
    let (mut listener, listener_id) = connect(addr);
    join(&mut listener, &listener_id);
    for n in 0..5 {
        send_json(&mut sender, serde_json::json!({"event": "client-note", "channel": channel, "data": {"n": n}}));
    }
    for n in 0..5 {
        // Relayed: accepted, so its webhook must survive what follows.
        let relayed = recv_json(&mut listener);
        assert_eq!(relayed["event"], "client-note");
        assert_eq!(relayed["data"], format!("{{\"n\":{n}}}"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(receiver.requests().is_empty(), "the one-minute batch had not been sent before the kill");
    let (mut child, _) = start_binary(&temp_config("crash-lifecycle-2", &config_text(50)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events: Vec<serde_json::Value> = receiver
            .requests()
            .iter()
            .flat_map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["events"].as_array().unwrap().clone()
            })
            .collect();
        if events.len() >= 5 || std::time::Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let mut notes: Vec<String> = events.iter().map(|e| e["data"].as_str().unwrap().to_string()).collect();
    notes.sort();
    assert_eq!(notes, (0..5).map(|n| format!("{{\"n\":{n}}}")).collect::<Vec<_>>(), "{events:?}");
    for request in receiver.requests() {
        let expected = hex::encode(ring::hmac::sign(&key, &request.body));
        assert_eq!(request.header("x-pusher-signature"), Some(expected.as_str()));
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A node whose shard 1 panics once `trigger` is set (a fault injected through the start hook).
fn start_with_faulty_shard(shutdown_grace_ms: u64, trigger: Arc<AtomicBool>) -> ringwire::Server {
    let mut config = ringwire::Config::default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.server.shards = 2;
    config.server.shutdown_grace_ms = shutdown_grace_ms;
    if std::env::var("RINGWIRE_TEST_DRIVER").as_deref() == Ok("epoll") {
        config.server.io_driver = ringwire::config::IoDriver::Epoll;
    }
    let hook: ringwire::server::ShardStartHook = Arc::new(move |index| {
        if index == 1 {
            let trigger = trigger.clone();
            monoio::spawn(async move {
                while !trigger.load(Ordering::SeqCst) {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("fault injected by the test");
            });
        }
    });
    ringwire::Server::start_with(config, Some(hook)).expect("server starts")
}

/// A shard that panics is never a silent zombie: the surviving shard's `/health` and
/// `/ready` answer 503 naming it while the node stops, and the node stops by itself.
#[test]
fn shard_panic_stops_the_node() {
    let trigger = Arc::new(AtomicBool::new(false));
    let server = start_with_faulty_shard(8000, trigger.clone());
    let addr = server.addr;
    // WebSocket clients that never answer the close keep the surviving shard draining for
    // the grace period, the window in which its health is checked.
    let clients: Vec<Ws> = (0..8).map(|_| connect(addr).0).collect();
    // Keep-alive connections spread over both shards by the kernel, each proven live first.
    let mut connections: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            stream.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            let n = stream.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            stream
        })
        .collect();
    trigger.store(true, Ordering::SeqCst);
    // Poll every connection; from the first answer that names shard 1 as down, one more full
    // pass: no connection may call the node healthy any more (a dead shard's answer nothing).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut unhealthy, mut healthy_after) = (0, 0);
    let mut passes_after = 0;
    while passes_after < 2 && std::time::Instant::now() < deadline {
        let seen_before = unhealthy > 0;
        for stream in &mut connections {
            for path in ["/health", "/ready"] {
                let _ = stream.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
                let mut buf = [0u8; 512];
                let n = stream.read(&mut buf).unwrap_or(0);
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.starts_with("HTTP/1.1 503") {
                    assert!(text.contains(r#""shards_down":[1]"#), "{text}");
                    unhealthy += 1;
                } else if text.starts_with("HTTP/1.1 200") && seen_before {
                    healthy_after += 1;
                }
            }
        }
        passes_after += usize::from(unhealthy > 0);
    }
    assert!(
        unhealthy > 0 && healthy_after == 0,
        "{unhealthy} unhealthy, {healthy_after} healthy answers after the panic"
    );
    drop(clients);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.join();
        let _ = done_tx.send(());
    });
    assert!(done_rx.recv_timeout(Duration::from_secs(15)).is_ok(), "the node stopped by itself");
}

/// The binary's panic policy (`abort_on_panic`): a shard panic aborts the whole process at
/// once with a line that says why, so a supervisor restarts it. Runs itself as a child.
#[test]
fn shard_panic_aborts_the_process() {
    if std::env::var_os("RINGWIRE_PANIC_CHILD").is_some() {
        ringwire::server::abort_on_panic();
        let _server = start_with_faulty_shard(3000, Arc::new(AtomicBool::new(true)));
        std::thread::sleep(Duration::from_secs(20));
        unreachable!("the process should have aborted");
    }
    let started = std::time::Instant::now();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "process::shard_panic_aborts_the_process", "--nocapture"])
        .env("RINGWIRE_PANIC_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("fault injected by the test"), "{stderr}");
    assert!(stderr.contains("thread ringwire-shard-1 panicked") && stderr.contains("aborting"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A reader of the start-up lines that goes away (a closed pipe) does not stop the node: it
/// keeps serving and still shuts down cleanly on SIGTERM.
#[test]
fn closed_stdout_does_not_stop_the_node() {
    let config = temp_config("stdout", "[server]\nbind = \"127.0.0.1:0\"\nshards = 1\n");
    let mut child = binary().arg("--config").arg(&config).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let addr: SocketAddr = first.split_whitespace().nth(3).unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(raw_http(addr, b"GET /health HTTP/1.1\r\n\r\n").0, 200);
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}
