//! `wss://` and `https://` on ringwire's own TLS listener: every route works over TLS beside
//! the plain listener, plain HTTP on the TLS port gets a clear 400, slow or broken handshakes
//! are cut and counted, and bad certificate files are refused at start naming the file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringwire::config::TlsConfig;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::*;

/// A private CA and a `localhost` certificate it signed, written as PEM files.
struct Pki {
    ca_pem: String,
    cert_file: PathBuf,
    key_file: PathBuf,
    dir: PathBuf,
}

fn make_pki(name: &str) -> Pki {
    let pki = test_pki();
    let dir = temp_dir(name);
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, format!("{}{}", pki.leaf_pem, pki.ca_pem)).unwrap();
    std::fs::write(&key_file, &pki.key_pem).unwrap();
    Pki { ca_pem: pki.ca_pem, cert_file, key_file, dir }
}

fn tls_config(pki: &Pki) -> TlsConfig {
    TlsConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        cert_file: pki.cert_file.clone(),
        key_file: pki.key_file.clone(),
        handshake_timeout_ms: 10_000,
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS client connection to `addr` trusting only the test CA, offering ALPN http/1.1.
fn tls_connect(addr: SocketAddr, pki: &Pki) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connection = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(connection, tcp)
}

use rustls::pki_types::pem::PemObject;

/// One HTTPS request on its own connection; returns (status, body).
fn https(addr: SocketAddr, pki: &Pki, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tls_connect(addr, pki);
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).unwrap();
    let mut response = Vec::new();
    // A peer that closes without close_notify is an error to rustls; what arrived counts.
    let _ = stream.read_to_end(&mut response);
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN");
    parse_response(&response)
}

fn start(pki: &Pki, change: impl FnOnce(&mut ringwire::Config)) -> TestServer {
    let tls = tls_config(pki);
    TestServer::start(|c| {
        c.tls = Some(tls);
        change(c);
    })
}

/// The HTTP API, health and metrics over https, and a Pusher WebSocket over wss receiving an
/// event published over https, another over plain http, and a burst larger than one TLS
/// record, in order; a plain client on the plain port meanwhile is unaffected.
#[test]
fn wss_and_https_serve_every_route() {
    let pki = make_pki("tls-routes");
    let server = start(&pki, |_| {});
    let tls_addr = server.tls_addr.expect("a TLS listener");
    assert_eq!(https(tls_addr, &pki, "GET", "/health", b"").0, 200);
    assert_eq!(https(tls_addr, &pki, "GET", "/ready", b"").0, 200);

    let stream = tls_connect(tls_addr, &pki);
    let url = format!("wss://localhost:{}/app/{KEY}?protocol=7", tls_addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("wss handshake");
    let established: Value = serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(established["event"], "pusher:connection_established");
    ws.send(Message::text(json!({"event": "pusher:subscribe", "data": {"channel": "secure"}}).to_string())).unwrap();
    let subscribed: Value = serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(subscribed["event"], "pusher_internal:subscription_succeeded");

    let body = json!({"name": "over-https", "channel": "secure", "data": "{\"n\":1}"}).to_string();
    let path = format!("/apps/{APP_ID}/events");
    let target = signed_path("POST", &path, body.as_bytes(), &[]);
    assert_eq!(https(tls_addr, &pki, "POST", &target, body.as_bytes()).0, 200);
    assert_eq!(publish(server.addr, &["secure"], "over-http", "{\"n\":2}", None).0, 200);
    let big = "x".repeat(9_000);
    for i in 0..20 {
        assert_eq!(publish(server.addr, &["secure"], "burst", &format!("{i}:{big}"), None).0, 200);
    }
    let mut names = Vec::new();
    while names.len() < 22 {
        let message: Value = serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
        let name = message["event"].as_str().unwrap().to_string();
        if name == "burst" {
            let data = message["data"].as_str().unwrap();
            assert!(data.starts_with(&format!("{}:", names.len() - 2)), "in order");
            assert_eq!(data.len(), big.len() + data.find(':').unwrap() + 1);
        }
        names.push(name);
    }
    assert_eq!(names[..2], ["over-https", "over-http"]);

    let (status, metrics) = https(tls_addr, &pki, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    let handshakes: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ringwire_tls_handshakes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(handshakes >= 5, "{handshakes} handshakes counted");
    let (mut plain, _) = connect(server.addr);
    subscribe(&mut plain, "plain");
}

/// Plain HTTP sent to the TLS port is answered once, in plaintext, with a 400 that says what
/// to do; the TLS port keeps serving TLS.
#[test]
fn plain_http_on_the_tls_port() {
    let pki = make_pki("tls-plain");
    let server = start(&pki, |_| {});
    let tls_addr = server.tls_addr.unwrap();
    let (status, body) = raw_http(tls_addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 400);
    assert!(body.contains("this port speaks TLS"), "{body}");
    assert_eq!(https(tls_addr, &pki, "GET", "/health", b"").0, 200);
}

/// A flood of handshakes that stall (slowloris) is cut at `tls.handshake_timeout_ms`, and
/// garbage after a TLS record header is refused at once; all are counted, and other clients
/// are served meanwhile.
#[test]
fn slow_and_broken_handshakes_are_cut() {
    let pki = make_pki("tls-slow");
    let server = start(&pki, |c| c.tls.as_mut().unwrap().handshake_timeout_ms = 300);
    let tls_addr = server.tls_addr.unwrap();
    let mut flood: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut slow = TcpStream::connect(tls_addr).unwrap();
            slow.write_all(&[0x16, 0x03, 0x01]).unwrap();
            slow
        })
        .collect();
    let mut garbage = TcpStream::connect(tls_addr).unwrap();
    garbage.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00]).unwrap();
    assert_eq!(https(tls_addr, &pki, "GET", "/health", b"").0, 200, "served meanwhile");
    for stream in flood.iter_mut().chain([&mut garbage]) {
        let started = Instant::now();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(started.elapsed() < Duration::from_secs(3), "cut by the server");
        // Only an alert, never an HTTP answer, goes back on a broken handshake.
        assert!(rest.is_empty() || rest[0] == 0x15, "{rest:?}");
    }
    let failures = metric(server.addr, "tls_handshake_failures_total").iter().sum::<u64>();
    assert_eq!(failures, 201);
}

/// Missing, empty and mismatched certificate files are refused at start, naming the key and
/// the file.
#[test]
fn bad_certificate_files_are_refused() {
    let pki = make_pki("tls-bad");
    let other = make_pki("tls-other");
    let cases: [(&str, TlsConfig); 3] = [
        ("tls.cert_file", TlsConfig { cert_file: pki.dir.join("missing.pem"), ..tls_config(&pki) }),
        ("tls.cert_file", TlsConfig { cert_file: pki.key_file.clone(), ..tls_config(&pki) }),
        ("tls.key_file", TlsConfig { key_file: other.key_file.clone(), ..tls_config(&pki) }),
    ];
    for (key, tls) in cases {
        let message = ringwire::net::tls::server_config(&tls).expect_err("refused");
        assert!(message.starts_with(key), "{message}");
        let mut config = ringwire::Config::default();
        config.server.bind = "127.0.0.1:0".parse().unwrap();
        config.tls = Some(tls);
        let error = ringwire::Server::start(config).err().expect("does not start");
        assert!(error.to_string().starts_with(key), "{error}");
    }
}

/// `ringwire check-config` reads the certificate files too: a good pair passes, a key that
/// does not match the certificate exits 2 with the key's name and the file on stderr.
#[test]
fn check_config_reads_the_certificates() {
    let pki = make_pki("tls-check");
    let other = make_pki("tls-check-other");
    let check = |key_file: &std::path::Path| {
        let config = pki.dir.join("check.toml");
        let text = format!(
            "[tls]\nbind = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.cert_file.display().to_string(),
            key_file.display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_ringwire")).arg("check-config").arg(&config).output().unwrap()
    };
    let good = check(&pki.key_file);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let bad = check(&other.key_file);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tls.key_file") && stderr.contains(&other.key_file.display().to_string()), "{stderr}");
}

/// Messages larger than rustls's 64 KiB send buffer go out whole (found by Autobahn over
/// wss: a 65 535-byte echo used to drop the connection).
#[test]
fn large_messages_over_wss() {
    let pki = make_pki("tls-large");
    let server = start(&pki, |c| {
        c.websocket.echo_enabled = true;
        c.websocket.frame_bytes_max = 1 << 20;
        c.websocket.message_bytes_max = 1 << 20;
        c.websocket.write_queue_bytes_max = 4 << 20;
    });
    let tls_addr = server.tls_addr.unwrap();
    let url = format!("wss://localhost:{}/echo", tls_addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), tls_connect(tls_addr, &pki)).expect("wss handshake");
    for size in [65_535, 300_000] {
        let text = "y".repeat(size);
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), text, "{size} bytes echoed");
    }
}

/// A reload swaps the certificate for new handshakes while open connections stay and keep
/// receiving; a reload whose certificate is unreadable is refused, naming the file, and the
/// certificate being served stays.
#[test]
fn certificate_reload_keeps_connections() {
    let old = make_pki("tls-reload-old");
    let tls = tls_config(&old);
    let mut config = ringwire::Config::default();
    let server = TestServer::start(|c| {
        c.tls = Some(tls.clone());
        config = c.clone();
    });
    let tls_addr = server.tls_addr.unwrap();
    let url = format!("wss://localhost:{}/app/{KEY}?protocol=7", tls_addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), tls_connect(tls_addr, &old)).expect("wss handshake");
    let _established = ws.read().unwrap();
    ws.send(Message::text(json!({"event": "pusher:subscribe", "data": {"channel": "stay"}}).to_string())).unwrap();
    let _subscribed = ws.read().unwrap();

    // New files at the same paths: another CA's certificate.
    let new = make_pki("tls-reload-new");
    std::fs::copy(&new.cert_file, &old.cert_file).unwrap();
    std::fs::copy(&new.key_file, &old.key_file).unwrap();
    let reloaded = server.server().reload(&config).expect("reloaded");
    assert!(reloaded.certificates && reloaded.needs_restart.is_empty(), "{reloaded:?}");
    assert_eq!(https(tls_addr, &new, "GET", "/health", b"").0, 200, "the new certificate is served");
    let mut stale = tls_connect(tls_addr, &old);
    assert!(stale.write_all(b"GET /health HTTP/1.1\r\n\r\n").is_err(), "the old CA no longer verifies");

    assert_eq!(publish(server.addr, &["stay"], "after-reload", "{}", None).0, 200);
    let message: Value = serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(message["event"], "after-reload", "the open connection stayed");

    std::fs::write(&old.cert_file, "not a certificate\n").unwrap();
    let error = server.server().reload(&config).expect_err("refused");
    assert!(error.starts_with("tls.cert_file"), "{error}");
    assert_eq!(https(tls_addr, &new, "GET", "/health", b"").0, 200, "the served certificate stays");
    let total = |name: &str| metric(server.addr, name).iter().sum::<u64>();
    assert_eq!((total("config_reloads_total"), total("config_reload_failures_total")), (1, 1));
}

/// The binary reloads on SIGHUP: a renewed certificate is served without a restart, and a
/// config file that fails validation is refused naming key and line while the node keeps
/// serving.
#[test]
fn sighup_reloads_the_certificate() {
    use std::io::BufRead;
    let old = make_pki("tls-hup-old");
    let config_path = old.dir.join("ringwire.toml");
    let config_text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nshards = 2\n[tls]\nbind = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        old.cert_file.display(),
        old.key_file.display()
    );
    std::fs::write(&config_path, &config_text).unwrap();
    let stderr_path = old.dir.join("stderr.log");
    let (mut child, mut stdout) = spawn_node(&config_path, &stderr_path);
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("TLS: wss://")) {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{lines:?}");
        lines.push(line);
    }
    let address = |prefix: &str| -> SocketAddr {
        let line = lines.iter().find(|l| l.contains(prefix)).unwrap();
        let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
        rest.split(['/', ' ']).next().unwrap().parse().unwrap()
    };
    let (plain, tls) = (address("listening on "), address("TLS: wss://"));
    assert_eq!(https(tls, &old, "GET", "/health", b"").0, 200);

    let new = make_pki("tls-hup-new");
    std::fs::copy(&new.cert_file, &old.cert_file).unwrap();
    std::fs::copy(&new.key_file, &old.key_file).unwrap();
    let hup = || std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(hup().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let renewed = loop {
        let mut stream = tls_connect(tls, &new);
        if stream.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n").is_ok() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(renewed, "the renewed certificate is served after SIGHUP");

    std::fs::write(&config_path, format!("{config_text}[server]\n")).unwrap();
    assert!(hup().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = String::new();
    while !log.contains("config reload refused") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = std::fs::read_to_string(&stderr_path).unwrap();
    }
    assert!(log.contains("config reload refused") && log.contains("line 8"), "{log}");
    assert_eq!(raw_http(plain, b"GET /health HTTP/1.1\r\n\r\n").0, 200, "still serving");
    assert_eq!(https(tls, &new, "GET", "/health", b"").0, 200, "still serving TLS");
    let _ = child.kill();
    let _ = child.wait();
}
