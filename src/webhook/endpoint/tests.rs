//! The transport against scripted local receivers: pipelining, `Connection: close` mid-batch,
//! the SSRF guard, and request heads.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;

use super::*;

fn endpoint(url: &str, signer: Signer) -> Endpoint {
    Endpoint {
        app: 0,
        id: "e".into(),
        key: "1/e".into(),
        url: url.into(),
        format: WebhookFormat::Standard,
        target: Target::parse(url).unwrap(),
        events: None,
        channels: None,
        event_types: None,
        batch_max: 1,
        signer,
    }
}

fn standard() -> Signer {
    Signer::Standard(StandardSigner::new(&["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()]).unwrap())
}

fn transport(allow_private: bool) -> Transport {
    Transport {
        addresses: AddressPolicy { allow_private, allowed: Vec::new() },
        tls: None,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        response_bytes_max: 1024,
    }
}

/// Runs `future` on a fresh single-threaded runtime (the legacy driver works everywhere).
fn run<F: std::future::Future>(future: F) -> F::Output {
    let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
    runtime.block_on(future)
}

/// A receiver that accepts one connection, reads until it holds `requests` complete requests
/// (each ends with the body `"{i}"`), and only then writes `answers` at once: a client that
/// waited for a response before sending the next request would time out.
fn scripted_receiver(requests: usize, answers: &'static str) -> (String, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        while received.windows(4).filter(|w| *w == b"POST").count() < requests
            || !received.ends_with(format!("\"{}\"", requests - 1).as_bytes())
        {
            let n = socket.read(&mut chunk).expect("the client sends every request before any answer");
            assert!(n > 0, "the client closed before sending all requests");
            received.extend_from_slice(&chunk[..n]);
        }
        socket.write_all(answers.as_bytes()).unwrap();
        // Hold the socket until the client is done reading.
        let _ = socket.read(&mut chunk);
        received
    });
    (url, thread)
}

fn requests(endpoint: &Endpoint, n: usize) -> Vec<(Bytes, Bytes)> {
    (0..n)
        .map(|i| {
            let body = Bytes::from(format!("\"{i}\""));
            (endpoint.request_head(&format!("msg_{i}"), 1_700_000_000, &body), body)
        })
        .collect()
}

/// Pipelining: N requests go out before any response, the responses are matched in order,
/// and a kept-alive connection stays open for the next exchange.
#[test]
fn pipelined_requests_get_ordered_responses() {
    let answers = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
                   HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom\
                   HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n";
    let (url, receiver) = scripted_receiver(3, answers);
    let endpoint = endpoint(&url, standard());
    let (results, kept) = run(async {
        let mut connection = None;
        let results = transport(true).exchange(&endpoint, &mut connection, requests(&endpoint, 3)).await;
        (results, connection.is_some())
    });
    let statuses: Vec<u16> = results.iter().map(|r| r.as_ref().unwrap().status).collect();
    assert_eq!(statuses, [200, 500, 429]);
    assert_eq!(results[1].as_ref().unwrap().excerpt, Bytes::from_static(b"boom"));
    assert_eq!(results[2].as_ref().unwrap().retry_after, Some(Duration::from_secs(7)));
    assert!(kept, "keep-alive responses keep the connection");
    let received = String::from_utf8(receiver.join().unwrap()).unwrap();
    let ids: Vec<&str> = received.match_indices("webhook-id: msg_").map(|(i, _)| &received[i + 12..i + 17]).collect();
    assert_eq!(ids, ["msg_0", "msg_1", "msg_2"], "requests are written in order");
}

/// A `Connection: close` mid-batch: the answered requests keep their responses, the rest come
/// back as errors (to be retried), and the connection is dropped so the next exchange dials.
#[test]
fn connection_close_mid_batch_leaves_the_rest_to_retry() {
    let answers = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n\
                   HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let (url, receiver) = scripted_receiver(4, answers);
    let endpoint = endpoint(&url, standard());
    let (results, kept) = run(async {
        let mut connection = None;
        let results = transport(true).exchange(&endpoint, &mut connection, requests(&endpoint, 4)).await;
        (results, connection.is_some())
    });
    assert_eq!(results.len(), 4, "one result per request");
    assert_eq!(results[0].as_ref().map(|r| r.status), Ok(200));
    assert!(results[1].as_ref().is_ok_and(|r| r.status == 200 && r.close));
    for unanswered in &results[2..] {
        assert!(matches!(unanswered, Err(AttemptError::Other(_))), "{unanswered:?}");
    }
    assert!(!kept, "a closing response drops the connection");
    receiver.join().unwrap();
}

/// The SSRF guard: a loopback target is refused before dialling, for every request.
#[test]
fn private_target_is_refused_without_dialling() {
    let endpoint = endpoint("http://127.0.0.1:9/hook", standard());
    let results = run(async {
        let mut connection = None;
        transport(false).exchange(&endpoint, &mut connection, requests(&endpoint, 2)).await
    });
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| matches!(r, Err(AttemptError::Refused(m)) if m.contains("non-public"))));
}

/// The request head carries the target's path and host, the body's length and the signer's
/// headers (Standard Webhooks: id, timestamp and a `v1,` signature of both with the body).
#[test]
fn request_head_is_signed_per_attempt() {
    let standard_endpoint = endpoint("http://example.com:8080/in?x=1", standard());
    let head = standard_endpoint.request_head("msg_abc", 1_700_000_000, b"{}");
    let head = std::str::from_utf8(&head).unwrap();
    assert!(head.starts_with("POST /in?x=1 HTTP/1.1\r\nHost: example.com:8080\r\n"), "{head}");
    assert!(head.contains("Content-Length: 2\r\n"), "{head}");
    assert!(head.contains("webhook-id: msg_abc\r\nwebhook-timestamp: 1700000000\r\nwebhook-signature: v1,"), "{head}");
    assert!(head.ends_with("\r\n\r\n"));
    let pusher = Signer::Pusher { app_key: "key".into(), secret: hmac::Key::new(hmac::HMAC_SHA256, b"secret") };
    let head = endpoint("http://example.com/", pusher).request_head("msg_abc", 0, b"{}");
    let head = std::str::from_utf8(&head).unwrap();
    assert!(head.contains("X-Pusher-Key: key\r\nX-Pusher-Signature: "), "{head}");
}

/// A CA file that holds no certificate is refused when the connector is built, naming the key.
#[test]
fn bad_ca_file_names_the_key() {
    let path = std::env::temp_dir().join(format!("ringwire-bad-ca-{}.pem", std::process::id()));
    std::fs::write(&path, "not a certificate\n").unwrap();
    let mut config = Config::default();
    config.apps[0].webhooks = vec![crate::config::WebhookConfig::pusher("https://example.com/hook")];
    config.webhooks.ca_file = Some(path.clone());
    let error = tls_connector(&config).err().expect("no certificate in the file");
    assert!(error.starts_with("webhooks.ca_file:"), "{error}");
    config.webhooks.ca_file = None;
    assert!(tls_connector(&config).unwrap().is_some(), "https endpoints get the Mozilla roots");
    config.apps[0].webhooks[0].url = "http://example.com/hook".into();
    assert!(tls_connector(&config).unwrap().is_none(), "no https endpoint, no connector");
    let _ = std::fs::remove_file(path);
}
