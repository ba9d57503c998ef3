//! `wss://` and `https://`: TLS on ringwire's own listener, with rustls (ring provider, TLS 1.2
//! and 1.3, ALPN `http/1.1`) driven through its sans-IO API over monoio sockets.
//!
//! Owns the handshake and the record layer of accepted TLS connections; knows nothing of HTTP
//! or WebSockets (`net::conn` sees plaintext through `net::stream`). rustls is used directly,
//! not through a wrapper stream, for three reasons: the read and write halves of a WebSocket
//! run in separate tasks and must share the TLS state without aliasing (`Rc<RefCell<_>>`,
//! never borrowed across an `.await`); a batch of frames must become one encryption pass and
//! one socket write (a wrapper's `writev` writes only its first buffer); and an idle
//! connection must hold no large buffer (a wrapper keeps 32 KiB per connection).
//!
//! Invariant: ciphertext reaches the socket only from the task that owns the write side (the
//! HTTP task before the upgrade, the writer task after it); TLS records the read side makes
//! (alerts, key updates) wait for the writer's next batch.

use std::cell::RefCell;
use std::io::{self, Read};

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use monoio::io::{AsyncWriteRentExt, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConnection;

use super::stream::{ByteReader, ByteStream, FrameWriter, Transport};
use crate::buf::{read_more, FrameBatch};
use crate::config::TlsConfig;

/// Ciphertext bytes asked for by a read that may wait (an idle connection's buffer is pinned by
/// its pending read, so it is small: most client messages fit).
const CIPHER_READ_SPARE: usize = 512;
/// Ciphertext bytes asked for by the further reads of a record that is arriving: one whole
/// TLS record (RFC 8446 §5.2: 2^14 bytes of plaintext plus at most 256 of expansion, and the
/// 5-byte header).
const CIPHER_RECORD_SPARE: usize = (1 << 14) + 256 + 5;
/// The first byte of a TLS record carrying a handshake (RFC 8446 §5.1: ContentType 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Loads `[tls]`: the certificate chain and key, checked to belong together. Called once at
/// start (and by `check-config`); errors name the file and the reason.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    Ok(listener_config(tls)?.0)
}

/// The listener's settings and the certificate slot a reload swaps.
pub fn listener_config(tls: &TlsConfig) -> Result<(Arc<rustls::ServerConfig>, Arc<Certificates>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = Arc::new(Certificates { current: ArcSwap::from_pointee(certified_key(tls, &provider)?) });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certificates.clone());
    // RFC 7301: only HTTP/1.1 is spoken here (WebSocket upgrades included).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), certificates))
}

/// Reads the chain and key of `tls` and checks that they belong together.
fn certified_key(tls: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = load_chain(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| format!("tls.key_file: cannot read a PEM private key from {}: {e}", tls.key_file.display()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "tls.key_file: {} does not fit the certificate in {}: {e}",
            tls.key_file.display(),
            tls.cert_file.display()
        )
    })
}

/// The certificate the TLS listener presents, swapped whole by a reload: handshakes after
/// the swap get the new one, open connections keep theirs. Reading it is lock-free (it is
/// read on shard threads, once per handshake).
#[derive(Debug)]
pub struct Certificates {
    current: ArcSwap<CertifiedKey>,
}

impl Certificates {
    /// Loads the files of `tls` and, when they are good, serves them from the next
    /// handshake on; on an error the current certificate stays.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), String> {
        let provider = rustls::crypto::ring::default_provider();
        self.current.store(Arc::new(certified_key(tls, &provider)?));
        Ok(())
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("tls.cert_file: cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert_file: {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("tls.cert_file: {} holds no PEM certificate", path.display()));
    }
    Ok(chain)
}

/// What a TLS listener needs for each connection.
#[derive(Clone)]
pub struct TlsSettings {
    /// The certificates and protocol settings.
    pub config: Arc<rustls::ServerConfig>,
    /// Time for the whole handshake.
    pub handshake_timeout: Duration,
}

/// Why a TLS handshake did not complete.
pub enum HandshakeError {
    /// The client spoke something else first (plain HTTP, most likely): the caller answers
    /// in plaintext, once, and closes.
    NotTls(TcpStream),
    /// The handshake failed (bad record, no common cipher, the peer left).
    Failed(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::NotTls(_) => write!(f, "the client did not start a TLS handshake"),
            HandshakeError::Failed(reason) => write!(f, "TLS handshake failed: {reason}"),
        }
    }
}

/// Runs a server handshake on an accepted socket (the caller bounds it in time).
pub async fn accept(mut tcp: TcpStream, settings: &TlsSettings) -> Result<TlsStream, HandshakeError> {
    let mut tls = ServerConnection::new(settings.config.clone()).map_err(|e| HandshakeError::Failed(e.to_string()))?;
    let mut cipher = BytesMut::new();
    let (result, returned) = read_more(&mut tcp, cipher, CIPHER_READ_SPARE).await;
    cipher = returned;
    match result {
        Ok(n) if n > 0 => {}
        Ok(_) => return Err(HandshakeError::Failed("the peer closed before a handshake".into())),
        Err(e) => return Err(HandshakeError::Failed(e.to_string())),
    }
    if cipher[0] != TLS_HANDSHAKE_RECORD {
        return Err(HandshakeError::NotTls(tcp));
    }
    while tls.is_handshaking() {
        if cipher.is_empty() {
            let (result, returned) = read_more(&mut tcp, cipher, CIPHER_READ_SPARE).await;
            cipher = returned;
            match result {
                Ok(n) if n > 0 => {}
                Ok(_) => return Err(HandshakeError::Failed("the peer closed during the handshake".into())),
                Err(e) => return Err(HandshakeError::Failed(e.to_string())),
            }
        }
        let processed = feed(&mut tls, &mut cipher);
        // Alerts about a failure are sent before giving up, as RFC 8446 §6.2 asks.
        let out = drain(&mut tls);
        if !out.is_empty() {
            let (result, _) = tcp.write_all(out).await;
            result.map_err(|e| HandshakeError::Failed(e.to_string()))?;
        }
        processed.map_err(|e| HandshakeError::Failed(e.to_string()))?;
    }
    Ok(TlsStream { tcp, tls: Rc::new(RefCell::new(tls)), cipher })
}

/// Hands buffered ciphertext to rustls and processes it, as far as rustls takes it now.
fn feed(tls: &mut ServerConnection, cipher: &mut BytesMut) -> Result<(), rustls::Error> {
    while !cipher.is_empty() {
        let mut reader: &[u8] = cipher;
        match tls.read_tls(&mut reader) {
            Ok(0) => break,
            Ok(n) => cipher.advance(n),
            // The plaintext buffer is full: the caller reads plaintext, then feeds the rest.
            Err(_) => break,
        }
        tls.process_new_packets()?;
    }
    Ok(())
}

/// Everything rustls has to send, as one buffer.
fn drain(tls: &mut ServerConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while tls.wants_write() {
        if tls.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}

/// Moves plaintext from rustls into `buf` (appending); `Some(0)` once the peer sent
/// `close_notify`, `None` when rustls holds none now.
fn take_plaintext(tls: &mut ServerConnection, buf: &mut BytesMut, spare: usize) -> io::Result<Option<usize>> {
    if buf.capacity() - buf.len() < spare {
        buf.reserve(spare);
    }
    let len = buf.len();
    let room = buf.capacity() - len;
    buf.resize(len + room, 0);
    match tls.reader().read(&mut buf[len..]) {
        Ok(n) => {
            buf.truncate(len + n);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            buf.truncate(len);
            Ok(None)
        }
        Err(e) => {
            buf.truncate(len);
            Err(e)
        }
    }
}

/// Reads plaintext into `buf`: what rustls holds, else more ciphertext from the socket.
async fn read_plaintext(
    tcp: &mut impl monoio::io::AsyncReadRent,
    tls: &RefCell<ServerConnection>,
    cipher: &mut BytesMut,
    mut buf: BytesMut,
    spare: usize,
) -> (io::Result<usize>, BytesMut) {
    // The first socket read of a call is the one an idle connection waits in; once bytes flow,
    // the rest of a record is read in one go.
    let mut read_spare = CIPHER_READ_SPARE;
    loop {
        {
            let mut tls = tls.borrow_mut();
            match take_plaintext(&mut tls, &mut buf, spare) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            let before = cipher.len();
            if let Err(e) = feed(&mut tls, cipher) {
                return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
            }
            if cipher.len() < before {
                continue; // rustls took more: there may be plaintext now
            }
        }
        let (result, returned) = read_more(tcp, std::mem::take(cipher), read_spare).await;
        *cipher = returned;
        read_spare = CIPHER_RECORD_SPARE;
        match result {
            // The peer closed the socket without close_notify: the end of the stream all the
            // same (what was read before was authenticated record by record).
            Ok(0) => return (Ok(0), buf),
            Ok(_) => {}
            Err(e) => return (Err(e), buf),
        }
    }
}

/// Encrypts `plaintext` (as few records as rustls allows) and writes it and anything rustls
/// had pending: one socket write, or one per 64 KiB for larger batches (rustls buffers at most
/// that much; it is the bound on what an encryption pass holds).
async fn write_plaintext(
    tcp: &mut impl monoio::io::AsyncWriteRent,
    tls: &RefCell<ServerConnection>,
    mut plaintext: &[u8],
) -> io::Result<()> {
    use std::io::Write;
    loop {
        let (taken, out) = {
            let mut tls = tls.borrow_mut();
            let taken = tls.writer().write(plaintext)?;
            (taken, drain(&mut tls))
        };
        plaintext = &plaintext[taken..];
        if taken == 0 && out.is_empty() && !plaintext.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS refused plaintext"));
        }
        if !out.is_empty() {
            let (result, _) = tcp.write_all(out).await;
            result?;
        }
        if plaintext.is_empty() {
            return Ok(());
        }
    }
}

/// A TLS connection before it is split: the HTTP phase.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Rc<RefCell<ServerConnection>>,
    /// Ciphertext read but not yet taken by rustls.
    cipher: BytesMut,
}

impl ByteStream for TlsStream {
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut) {
        read_plaintext(&mut self.tcp, &self.tls, &mut self.cipher, buf, spare).await
    }

    async fn write_whole(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        write_plaintext(&mut self.tcp, &self.tls, &bytes).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        close_notify(&mut self.tcp, &self.tls).await
    }
}

/// Sends `close_notify` (RFC 8446 §6.1), then a FIN.
async fn close_notify(tcp: &mut impl monoio::io::AsyncWriteRent, tls: &RefCell<ServerConnection>) -> io::Result<()> {
    let out = {
        let mut tls = tls.borrow_mut();
        tls.send_close_notify();
        drain(&mut tls)
    };
    let (result, _) = tcp.write_all(out).await;
    result?;
    tcp.shutdown().await
}

impl Transport for TlsStream {
    type Reader = TlsReader;
    type Writer = TlsWriter;

    fn raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    fn split_for_upgrade(self) -> (TlsReader, TlsWriter) {
        let (reader, writer) = self.tcp.into_split();
        (
            TlsReader { tcp: reader, tls: self.tls.clone(), cipher: self.cipher },
            TlsWriter { tcp: writer, tls: self.tls },
        )
    }
}

/// The read side of an upgraded TLS connection.
pub struct TlsReader {
    tcp: TcpOwnedReadHalf,
    tls: Rc<RefCell<ServerConnection>>,
    cipher: BytesMut,
}

impl ByteReader for TlsReader {
    async fn read_into(&mut self, buf: BytesMut, spare: usize) -> (io::Result<usize>, BytesMut) {
        if self.cipher.is_empty() && self.cipher.capacity() > CIPHER_READ_SPARE * 2 {
            // Keep an idle connection small after a large message.
            self.cipher = BytesMut::new();
        }
        read_plaintext(&mut self.tcp, &self.tls, &mut self.cipher, buf, spare).await
    }
}

/// The write side of an upgraded TLS connection.
pub struct TlsWriter {
    tcp: TcpOwnedWriteHalf,
    tls: Rc<RefCell<ServerConnection>>,
}

impl FrameWriter for TlsWriter {
    async fn write_frames(&mut self, batch: FrameBatch) -> bool {
        // One plaintext run, so a batch of small frames becomes few records, encrypted in one
        // pass and written with one call.
        let frames = batch.into_frames();
        let plaintext: Vec<u8> = frames.concat();
        write_plaintext(&mut self.tcp, &self.tls, &plaintext).await.is_ok()
    }

    async fn shutdown(&mut self) {
        let _ = close_notify(&mut self.tcp, &self.tls).await;
    }
}
