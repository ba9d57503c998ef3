//! Shared helpers: an in-process server on 127.0.0.1:0, WebSocket and raw HTTP clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringwire::config::IoDriver;
use ringwire::{Config, Server};
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub const APP_ID: &str = "1";
pub const KEY: &str = "ringwire-demo-key";
pub const SECRET: &str = "ringwire-demo-secret";
/// The Standard Webhooks secret test endpoints sign with.
pub const WHSEC: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// A server that shuts down when dropped.
pub struct TestServer {
    server: Option<Server>,
    pub addr: SocketAddr,
    /// The TLS listener, when the test configured `[tls]`.
    pub tls_addr: Option<SocketAddr>,
}

impl TestServer {
    /// Two shards on a free port, with the test's changes to the default config.
    pub fn start(change: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::default();
        config.server.bind = "127.0.0.1:0".parse().unwrap();
        config.server.shards = 2;
        config.server.shutdown_grace_ms = 300;
        config.server.shutdown_close_window_ms = 10;
        // Presence debounce off: most tests check member events as they happen; the tests of
        // the debounce set their window.
        config.apps.iter_mut().for_each(|app| app.presence_debounce_ms = 0);
        if let Ok(driver) = std::env::var("RINGWIRE_TEST_DRIVER") {
            config.server.io_driver = if driver == "epoll" { IoDriver::Epoll } else { IoDriver::IoUring };
        }
        change(&mut config);
        let server = Server::start(config).expect("server starts");
        let (addr, tls_addr) = (server.addr, server.tls_addr);
        TestServer { server: Some(server), addr, tls_addr }
    }

    /// The running node (for reloads).
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn stop_inner(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            server.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

pub type Ws = WebSocket<TcpStream>;

/// Opens a WebSocket to `path` (e.g. `/app/KEY?protocol=7`).
pub fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    ws
}

/// Connects to the demo app and returns the socket and its socket_id.
pub fn connect(addr: SocketAddr) -> (Ws, String) {
    let mut ws = ws_connect(addr, &format!("/app/{KEY}?protocol=7&client=js&version=8.4.0&flash=false"));
    let established = recv_json(&mut ws);
    assert_eq!(established["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(established["data"].as_str().expect("data is a string")).unwrap();
    (ws, data["socket_id"].as_str().unwrap().to_string())
}

/// The next text message, as raw text.
pub fn recv_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("message") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// The next text message, parsed.
pub fn recv_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&recv_text(ws)).unwrap()
}

/// Sends a JSON text message.
pub fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string())).unwrap();
}

/// Subscribes and checks the exact subscription_succeeded bytes.
pub fn subscribe(ws: &mut Ws, channel: &str) {
    send_json(ws, serde_json::json!({"event": "pusher:subscribe", "data": {"auth": "", "channel": channel}}));
    assert_eq!(
        recv_text(ws),
        format!(r#"{{"event":"pusher_internal:subscription_succeeded","channel":"{channel}","data":"{{}}"}}"#)
    );
}

/// Reads until the server's close frame and returns its code (tungstenite answers it).
pub fn recv_close(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
            Ok(Message::Close(None)) => return u16::from(CloseCode::Status),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `path?signed-query` for a request signed with the demo app's secret.
pub fn signed_path(method: &str, path: &str, body: &[u8], extra: &[(&str, &str)]) -> String {
    let query = ringwire::pusher::auth::signed_query(method, path, KEY, SECRET, body, now(), extra);
    format!("{path}?{query}")
}

/// One HTTP request on its own connection; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n").into_bytes();
    if !body.is_empty() || method == "POST" {
        request.extend_from_slice(
            format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).as_bytes(),
        );
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    raw_http(addr, &request)
}

/// Sends raw bytes, reads to EOF, splits status and body.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse_response(&response)
}

/// (status, body) of a complete response.
pub fn parse_response(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Publishes `data` (a JSON string) on channels through the signed API.
pub fn publish(addr: SocketAddr, channels: &[&str], event: &str, data: &str, socket_id: Option<&str>) -> (u16, String) {
    let mut body = serde_json::json!({"name": event, "channels": channels, "data": data});
    if let Some(id) = socket_id {
        body["socket_id"] = id.into();
    }
    let body = body.to_string();
    let path = format!("/apps/{APP_ID}/events");
    http(addr, "POST", &signed_path("POST", &path, body.as_bytes(), &[]), body.as_bytes())
}

/// A metric's value summed over shards, from /metrics.
pub fn metric(addr: SocketAddr, name: &str) -> Vec<u64> {
    let (_, text) = http(addr, "GET", "/metrics", b"");
    text.lines()
        .filter(|l| l.starts_with(&format!("ringwire_{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// One request a `Receiver` got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// How a receiver writes its 200 response: the shapes real servers produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Head and a 2-byte body in one write.
    Whole,
    /// The head, then the body 50 ms later (Python's `http.server`, many frameworks).
    HeadThenBody,
    /// A chunked body written in several pieces, with a chunk extension and a trailer.
    Chunked,
    /// A 20 KB JSON body (more than one read's worth).
    LargeBody,
    /// `100 Continue`, then the final response 20 ms later.
    Continue,
}

/// A webhook receiver on 127.0.0.1:0 (keep-alive HTTP/1.1). It answers each request with the
/// next scripted response (`"TIMEOUT"` = never answer and close later), then with a 200 in
/// its `Shape`.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    script: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    shape: std::sync::Arc<std::sync::Mutex<Shape>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0")
    }

    pub fn start_on(address: &str) -> Receiver {
        Receiver::start_with(address, None)
    }

    /// A receiver speaking HTTPS with this server certificate chain and key (DER).
    pub fn start_tls(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Receiver {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let chain = chain.into_iter().map(rustls::pki_types::CertificateDer::from).collect();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Receiver::start_with("127.0.0.1:0", Some(std::sync::Arc::new(config)))
    }

    fn start_with(address: &str, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = std::net::TcpListener::bind(address).unwrap();
        let receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            requests: Default::default(),
            script: Default::default(),
            shape: std::sync::Arc::new(std::sync::Mutex::new(Shape::Whole)),
        };
        let shared = receiver.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => shared.serve(stream),
                    Some(config) => {
                        let connection = rustls::ServerConnection::new(config).unwrap();
                        shared.serve(rustls::StreamOwned::new(connection, stream))
                    }
                });
            }
        });
        receiver
    }

    /// The next responses, in order (status lines and headers; `"TIMEOUT"` hangs).
    pub fn script(&self, responses: &[&str]) {
        self.script.lock().unwrap().extend(responses.iter().map(|r| r.to_string()));
    }

    /// How the 200 responses are written from now on.
    pub fn set_shape(&self, shape: Shape) {
        *self.shape.lock().unwrap() = shape;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// The Pusher lifecycle events received so far, in order: (name, channel, user_id).
    pub fn lifecycle_events(&self) -> Vec<(String, String, String)> {
        self.requests()
            .iter()
            .flat_map(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                body["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        let field = |k: &str| e[k].as_str().unwrap_or("").to_string();
                        (field("name"), field("channel"), field("user_id"))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until at least `n` requests arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n || std::time::Instant::now() > deadline {
                return requests;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn serve(&self, mut stream: impl Read + Write) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let head_end = loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
            let mut lines = head.split("\r\n");
            let path = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize =
                headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            while buffer.len() < head_end + length {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buffer[head_end..head_end + length].to_vec();
            buffer.drain(..head_end + length);
            self.requests.lock().unwrap().push(Received { path, headers, body, at: std::time::Instant::now() });
            let response = self.script.lock().unwrap().pop_front();
            match response.as_deref() {
                Some("TIMEOUT") => {
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                }
                Some(status) => {
                    let _ = stream.write_all(format!("{status}\r\nContent-Length: 4\r\n\r\nnope").as_bytes());
                }
                None => {
                    let shape = *self.shape.lock().unwrap();
                    if write_shaped(&mut stream, shape).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Writes a 200 response the way `shape` says, flushing between the pieces so that they
/// arrive in separate reads.
fn write_shaped(stream: &mut impl Write, shape: Shape) -> std::io::Result<()> {
    let mut piece = |bytes: &[u8], pause_ms: u64| -> std::io::Result<()> {
        stream.write_all(bytes)?;
        stream.flush()?;
        std::thread::sleep(Duration::from_millis(pause_ms));
        Ok(())
    };
    match shape {
        Shape::Whole => piece(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0),
        Shape::HeadThenBody => {
            piece(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n", 50)?;
            piece(b"{\"status\":\"ok\"}", 0)
        }
        Shape::Chunked => {
            piece(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 10)?;
            piece(b"4;note=first\r\n{\"ok\r\n", 10)?;
            piece(b"5\r\n\":tru\r\n", 10)?;
            piece(b"2\r\ne}\r\n0\r\nX-Trailer: yes\r\n\r\n", 0)
        }
        Shape::LargeBody => {
            let body = format!("{{\"padding\":\"{}\"}}", "x".repeat(20_000));
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
            piece(head.as_bytes(), 5)?;
            for part in body.as_bytes().chunks(4096) {
                piece(part, 1)?;
            }
            Ok(())
        }
        Shape::Continue => {
            piece(b"HTTP/1.1 100 Continue\r\n\r\n", 20)?;
            piece(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0)
        }
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ringwire-test-{}-{name}-{}", std::process::id(), fastrand_u64()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn fastrand_u64() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// A signed GET or POST to the API; returns (status, JSON body).
pub fn api(addr: SocketAddr, method: &str, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let target = signed_path(method, path, b"", query);
    let (status, body) = http(addr, method, &target, b"");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A private CA and a `localhost` certificate it signed (for TLS tests).
pub struct TestPki {
    /// The CA certificate, PEM and DER.
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    /// The leaf certificate, PEM and DER.
    pub leaf_pem: String,
    pub leaf_der: Vec<u8>,
    /// The leaf's private key, PEM and PKCS#8 DER.
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "ringwire test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    TestPki {
        ca_pem: ca.pem(),
        ca_der: ca.der().to_vec(),
        leaf_pem: leaf.pem(),
        leaf_der: leaf.der().to_vec(),
        key_pem: leaf_key.serialize_pem(),
        key_der: leaf_key.serialize_der(),
    }
}

/// Starts the ringwire binary on `config`, its stderr going to the file `stderr`; returns the
/// process and a reader of its stdout (kept open: the node's start-up lines go there).
pub fn spawn_node(
    config: &std::path::Path,
    stderr: &std::path::Path,
) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringwire"))
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}
