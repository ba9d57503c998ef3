//! Webhook throughput: signed Standard Webhooks deliveries per second from ringwire to a local
//! keep-alive receiver, with the WAL in `fsync` mode (issue 4's scenario).
//!
//! `webhooks --server target/release/ringwire [--duration 10] [--publishers 16] [--batch 10]
//! [--connections 4] [--pipeline 1] [--durability fsync] [--shards 0]`
//!
//! It starts its own receiver (one blocking thread per connection: parse with httparse, answer
//! 200, count; every 1000th body's signature is checked with ring so the figure is of signed
//! deliveries), writes a config that points one Standard Webhooks endpoint at it, starts the
//! server, and publishes closed-loop through `/batch_events` on `--publishers` keep-alive
//! connections (each API answer waits for the fsync, so this measures accepted events too).
//! After `--duration` it stops publishing, waits for every accepted event to be delivered,
//! and prints one JSON line: accepted events/s, deliveries/s, fsyncs/s and events per fsync.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::hmac;

const SECRET_B64: &str = "C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const KEY: &str = "ringwire-demo-key";
const SECRET: &str = "ringwire-demo-secret";

struct Options {
    server: String,
    duration: Duration,
    publishers: usize,
    batch: usize,
    connections: usize,
    pipeline: usize,
    durability: String,
    shards: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        server: "target/release/ringwire".into(),
        duration: Duration::from_secs(10),
        publishers: 16,
        batch: 10,
        connections: 4,
        pipeline: 1,
        durability: "fsync".into(),
        shards: 0,
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--server" => options.server = value.clone(),
            "--duration" => {
                options.duration = Duration::from_secs_f64(value.parse().map_err(|_| format!("--duration: {value}"))?)
            }
            "--publishers" => options.publishers = number()?.max(1),
            "--batch" => options.batch = number()?.clamp(1, 10),
            "--connections" => options.connections = number()?.max(1),
            "--pipeline" => options.pipeline = number()?.max(1),
            "--durability" => options.durability = value.clone(),
            "--shards" => options.shards = number()?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(options)
}

/// Counts deliveries and checks a sample of signatures.
#[derive(Default)]
struct Received {
    deliveries: AtomicU64,
    bad_signatures: AtomicU64,
    last_ns: AtomicU64,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn start_receiver(received: Arc<Received>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let received = received.clone();
            std::thread::spawn(move || serve(stream, &received));
        }
    });
    addr
}

fn serve(mut stream: TcpStream, received: &Received) {
    let _ = stream.set_nodelay(true);
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(SECRET_B64).unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key_bytes);
    let mut buffer = vec![0u8; 1 << 16];
    let (mut start, mut end) = (0usize, 0usize);
    let mut replies = Vec::with_capacity(4096);
    loop {
        // Answer every complete request in the buffer with one write.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = request.parse(&buffer[start..end]) else { break };
            let header = |name: &str| {
                request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value).unwrap_or(b"")
            };
            let length: usize =
                std::str::from_utf8(header("content-length")).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            if end - start < head + length {
                break;
            }
            let count = received.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
            if count % 1000 == 1 {
                let mut content = Vec::new();
                content.extend_from_slice(header("webhook-id"));
                content.push(b'.');
                content.extend_from_slice(header("webhook-timestamp"));
                content.push(b'.');
                content.extend_from_slice(&buffer[start + head..start + head + length]);
                let expected =
                    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, &content)));
                if header("webhook-signature") != expected.as_bytes() {
                    received.bad_signatures.fetch_add(1, Ordering::Relaxed);
                }
            }
            start += head + length;
            replies.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
        if !replies.is_empty() {
            received.last_ns.store(now_ns(), Ordering::Relaxed);
            if stream.write_all(&replies).is_err() {
                return;
            }
            replies.clear();
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buffer.len() {
            buffer.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        match stream.read(&mut buffer[end..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
    }
}

fn start_server(options: &Options, receiver: SocketAddr, data_dir: &std::path::Path) -> (Child, SocketAddr) {
    let config = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nshards = {}\n\n[http]\nkeepalive_timeout_ms = 600000\n\n\
         [webhooks]\ndata_dir = {:?}\ndurability = {:?}\nallow_private_targets = true\n\
         connections_per_endpoint_max = {}\npipeline_max = {}\nqueue_bytes_max = 1073741824\n\n\
         [[apps]]\nid = \"1\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\nbatch_events_max = 10\n\n\
         [[apps.webhooks]]\nurl = \"http://{receiver}/hook\"\nformat = \"standard\"\nsecret = \"whsec_{SECRET_B64}\"\n",
        options.shards,
        data_dir.to_str().unwrap(),
        options.durability,
        options.connections,
        options.pipeline,
    );
    let path = data_dir.join("ringwire.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(&options.server)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", options.server));
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let addr = first.split_whitespace().nth(3).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("{first}"));
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (child, addr)
}

/// One closed-loop publisher: a keep-alive connection sending `/batch_events` requests.
fn publisher(addr: SocketAddr, batch: usize, index: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut stream = TcpStream::connect(addr).unwrap();
    let _ = stream.set_nodelay(true);
    let mut accepted = 0u64;
    let mut response = vec![0u8; 4096];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<String> = (0..batch)
            .map(|i| {
                n += 1;
                format!(r#"{{"name":"order.created","channel":"orders-{index}","data":"{{\"n\":{n},\"i\":{i}}}"}}"#)
            })
            .collect();
        let body = format!(r#"{{"batch":[{}]}}"#, events.join(","));
        let path = "/apps/1/batch_events";
        let query = ringwire::pusher::auth::signed_query(
            "POST",
            path,
            KEY,
            SECRET,
            body.as_bytes(),
            now_ns() / 1_000_000_000,
            &[],
        );
        let request = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(request.as_bytes()).is_err() {
            break;
        }
        // Answers are small: read until the head and its (short) body are in.
        let mut have = 0;
        let ok = loop {
            match stream.read(&mut response[have..]) {
                Ok(0) | Err(_) => break false,
                Ok(read) => have += read,
            }
            let text = &response[..have];
            if let Some(head_end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&text[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                if have >= head_end + 4 + length {
                    break head.starts_with("http/1.1 200");
                }
            }
        };
        if !ok {
            break;
        }
        accepted += batch as u64;
    }
    accepted
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let mut stream = TcpStream::connect(addr).unwrap();
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(&format!("ringwire_{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn main() {
    let options = parse_options().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let received = Arc::new(Received::default());
    let receiver = start_receiver(received.clone());
    let data_dir = std::env::temp_dir().join(format!("ringwire-bench-webhooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir).unwrap();
    let (mut server, addr) = start_server(&options, receiver, &data_dir);
    let fsyncs_before = metric(addr, "wal_fsyncs_total");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let started_ns = now_ns();
    let publishers: Vec<_> = (0..options.publishers)
        .map(|i| {
            let stop = stop.clone();
            let batch = options.batch;
            std::thread::spawn(move || publisher(addr, batch, i, stop))
        })
        .collect();
    let mut last_report = Instant::now();
    while started.elapsed() < options.duration {
        std::thread::sleep(Duration::from_millis(100));
        if last_report.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "[webhooks] {:.0} s: {} delivered",
                started.elapsed().as_secs_f64(),
                received.deliveries.load(Ordering::Relaxed)
            );
            last_report = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let accepted: u64 = publishers.into_iter().map(|p| p.join().unwrap()).sum();
    let publish_s = started.elapsed().as_secs_f64();
    let fsyncs = metric(addr, "wal_fsyncs_total") - fsyncs_before;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.deliveries.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let delivered = received.deliveries.load(Ordering::Relaxed);
    let delivery_s = (received.last_ns.load(Ordering::Relaxed).saturating_sub(started_ns)) as f64 / 1e9;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
    println!(
        "{}",
        serde_json::json!({
            "scenario": "webhooks",
            "durability": options.durability,
            "publishers": options.publishers,
            "batch": options.batch,
            "connections_per_endpoint": options.connections,
            "pipeline": options.pipeline,
            "accepted": accepted,
            "delivered": delivered,
            "bad_signatures": received.bad_signatures.load(Ordering::Relaxed),
            "accepted_per_s": (accepted as f64 / publish_s).round(),
            "deliveries_per_s": (delivered as f64 / delivery_s.max(1e-9)).round(),
            "fsyncs_per_s": (fsyncs as f64 / publish_s).round(),
            "events_per_fsync": if fsyncs > 0 { (accepted as f64 / fsyncs as f64 * 10.0).round() / 10.0 } else { 0.0 },
        })
    );
    if delivered < accepted {
        eprintln!("[webhooks] only {delivered} of {accepted} accepted events were delivered in time");
        std::process::exit(1);
    }
}
