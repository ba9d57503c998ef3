//! Host-name lookups for webhook targets, on the node's own DNS threads.
//!
//! A blocking `getaddrinfo` cannot be cancelled, and a domain whose nameservers never answer
//! holds its thread for as long as the system resolver retries (or forever, for a lookup
//! that hangs). So the whole failure is bounded here, not only the waiting side:
//! - lookups run on `webhooks.dns_threads` threads of their own, never on the runtime's
//!   blocking pool, so a stuck lookup cannot delay the WAL's file-system calls there;
//! - one lookup per host is in flight node-wide (an atomic flag per configured host): a
//!   shard that needs a host another shard is looking up waits for that lookup's end, and
//!   every attempt of one shard that needs the host waits for the shard's single lookup, so
//!   one dead domain occupies at most one thread;
//! - each wait ends after `webhooks.dns_timeout_ms` with a retryable
//!   "DNS lookup of HOST timed out after N ms" (the lookup itself may go on; its answer is
//!   still cached when it comes);
//! - successful answers are cached per shard for `webhooks.dns_cache_ttl_ms` (0: not
//!   cached). The SSRF guard vets every address at each connect, cached or not.
//!
//! No lock is taken on a shard thread: the per-host flags are atomics in a table that is
//! read-only after start, an answer comes back through a `OnceLock` and an `AtomicWaker`, and
//! the cache and waiting lists are the shard's own.
//!
//! The lookup function is passed in (`Server::start_with_lookup`): production uses the
//! system resolver, tests one that hangs for chosen hosts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use crate::config::Config;
use crate::target::Target;

/// Resolves a target's host: literal IPs directly, names through this shard's resolver
/// (its own threads, single flight per host, a timeout and a short cache).
pub async fn resolve_target(target: &Target) -> io::Result<Vec<SocketAddr>> {
    if let Some(ip) = target.literal_ip() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    match current() {
        Some(resolver) => resolver.resolve(&target.host, target.port).await,
        None => Err(io::Error::other("no DNS resolver on this thread (not a shard thread)")),
    }
}

/// A blocking host-name lookup. It runs on the resolver's threads and may block as long as
/// it likes; the resolver bounds what that costs.
pub type Lookup = Arc<dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// The system resolver (`getaddrinfo`, through the standard library).
pub fn system_lookup() -> Lookup {
    Arc::new(|host: &str| Ok((host, 0).to_socket_addrs()?.map(|a| a.ip()).collect()))
}

/// What a finished lookup produced: the addresses, or the error's text.
type Answer = Result<Arc<[IpAddr]>, String>;

/// Where a DNS thread leaves one lookup's answer for the shard that asked.
#[derive(Default)]
struct Reply {
    answer: OnceLock<Answer>,
    waker: AtomicWaker,
}

/// One lookup job for the DNS threads.
struct Job {
    host: String,
    reply: Arc<Reply>,
    /// The host's node-wide "lookup in flight" flag, cleared when the lookup returns.
    busy: Arc<AtomicBool>,
}

/// A node's resolver, shared by its shards; its threads end once it is dropped and their
/// current lookup returns.
pub struct Resolver {
    jobs: crossbeam::channel::Sender<Job>,
    /// Per configured webhook host: whether a lookup of it is in flight. Read-only map.
    busy: HashMap<String, Arc<AtomicBool>>,
    timeout: Duration,
    cache_ttl: Duration,
}

impl Resolver {
    /// Starts `webhooks.dns_threads` lookup threads running `lookup`, for the webhook hosts
    /// of `config`.
    pub fn new(config: &Config, lookup: Lookup) -> io::Result<Resolver> {
        let settings = &config.webhooks;
        // Unbounded, yet bounded in practice: at most one queued job per configured host.
        let (jobs, queue) = crossbeam::channel::unbounded::<Job>();
        for index in 0..settings.dns_threads {
            let (lookup, queue) = (lookup.clone(), queue.clone());
            std::thread::Builder::new().name(format!("ringwire-dns-{index}")).spawn(move || {
                for job in queue {
                    run(&*lookup, job);
                }
            })?;
        }
        let busy = config
            .apps
            .iter()
            .flat_map(|app| &app.webhooks)
            .filter_map(|hook| Target::parse(&hook.url).ok())
            .filter(|target| target.literal_ip().is_none())
            .map(|target| (target.host, Arc::new(AtomicBool::new(false))))
            .collect();
        Ok(Resolver {
            jobs,
            busy,
            timeout: Duration::from_millis(settings.dns_timeout_ms),
            cache_ttl: Duration::from_millis(settings.dns_cache_ttl_ms),
        })
    }
}

/// Runs one lookup on a DNS thread and hands its answer back.
fn run(lookup: &(dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync), job: Job) {
    let answer: Answer = match lookup(&job.host) {
        Ok(addresses) if addresses.is_empty() => Err(format!("{} has no addresses", job.host)),
        Ok(addresses) => Ok(addresses.into()),
        Err(e) => Err(e.to_string()),
    };
    job.busy.store(false, Ordering::Release);
    let _ = job.reply.answer.set(answer);
    job.reply.waker.wake();
}

/// A cached answer: when it came, and the addresses.
type Cached = (Instant, Arc<[IpAddr]>);

/// A shard's side of the resolver: its cache and its lookups in flight.
pub struct ShardResolver {
    node: Arc<Resolver>,
    /// Per host: when it was answered, and the answer.
    cache: RefCell<HashMap<String, Cached>>,
    /// Per host: the answer of the shard's lookup in flight, once it comes.
    flights: RefCell<HashMap<String, Rc<Flight>>>,
}

/// A shard's lookup in flight, awaited by every attempt of the shard that needs the host.
#[derive(Default)]
struct Flight {
    answer: RefCell<Option<Answer>>,
    waiters: RefCell<slab::Slab<Waker>>,
}

impl ShardResolver {
    /// The shard's side of `node`.
    pub fn new(node: Arc<Resolver>) -> ShardResolver {
        ShardResolver { node, cache: RefCell::default(), flights: RefCell::default() }
    }

    /// The addresses of `host` with `port`, from the cache or a lookup; an error (retryable)
    /// when the lookup fails or does not answer within `webhooks.dns_timeout_ms`.
    pub async fn resolve(self: &Rc<Self>, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let with_port = |addresses: &[IpAddr]| addresses.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        if let Some((at, addresses)) = self.cache.borrow().get(host) {
            if at.elapsed() < self.node.cache_ttl {
                return Ok(with_port(addresses));
            }
        }
        let Some(busy) = self.node.busy.get(host).cloned() else {
            return Err(io::Error::other(format!("{host} is not a configured webhook host")));
        };
        let flight = self.flights.borrow().get(host).cloned();
        let flight = match flight {
            Some(flight) => flight,
            None => {
                let flight = Rc::new(Flight::default());
                self.flights.borrow_mut().insert(host.to_string(), flight.clone());
                monoio::spawn(self.clone().fly(host.to_string(), busy, flight.clone()));
                flight
            }
        };
        match monoio::time::timeout(self.node.timeout, Wait { flight, waiter: None }).await {
            Ok(Ok(addresses)) => Ok(with_port(&addresses)),
            Ok(Err(message)) => Err(io::Error::other(message)),
            Err(_elapsed) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("DNS lookup of {host} timed out after {} ms", self.node.timeout.as_millis()),
            )),
        }
    }

    /// The shard's lookup of `host`: waits for the node-wide flag (another shard's lookup of
    /// the host), sends the job, waits for the answer however long it takes, then completes
    /// the flight. One such task per host per shard at most.
    async fn fly(self: Rc<Self>, host: String, busy: Arc<AtomicBool>, flight: Rc<Flight>) {
        // Another shard's lookup of the host ends by itself (its answer is not shared); polling
        // keeps the flag a plain atomic, and backing off to 100 ms keeps a lookup that never
        // ends from costing more than ten wake-ups a second.
        let mut pause = Duration::from_millis(5);
        while busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            monoio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        let reply = Arc::new(Reply::default());
        let job = Job { host: host.clone(), reply: reply.clone(), busy: busy.clone() };
        let answer = match self.node.jobs.send(job) {
            Ok(()) => {
                poll_fn(|cx| {
                    reply.waker.register(cx.waker());
                    match reply.answer.get() {
                        Some(answer) => Poll::Ready(answer.clone()),
                        None => Poll::Pending,
                    }
                })
                .await
            }
            Err(_) => {
                busy.store(false, Ordering::Release);
                Err("the DNS threads have stopped".to_string())
            }
        };
        self.flights.borrow_mut().remove(&host);
        if let Ok(addresses) = &answer {
            if !self.node.cache_ttl.is_zero() {
                self.cache.borrow_mut().insert(host, (Instant::now(), addresses.clone()));
            }
        }
        *flight.answer.borrow_mut() = Some(answer);
        for (_, waker) in std::mem::take(&mut *flight.waiters.borrow_mut()) {
            waker.wake();
        }
    }
}

/// Waits for a flight's answer; leaves the flight's waiting list when dropped (timeout
/// included), so a lookup that never ends does not collect wakers.
struct Wait {
    flight: Rc<Flight>,
    waiter: Option<usize>,
}

impl Future for Wait {
    type Output = Answer;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answer> {
        let this = &mut *self;
        if let Some(answer) = &*this.flight.answer.borrow() {
            return Poll::Ready(answer.clone());
        }
        let mut waiters = this.flight.waiters.borrow_mut();
        match this.waiter {
            Some(key) if waiters.contains(key) => waiters[key].clone_from(cx.waker()),
            _ => this.waiter = Some(waiters.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(key) = self.waiter.take() {
            let mut waiters = self.flight.waiters.borrow_mut();
            if waiters.contains(key) {
                waiters.remove(key);
            }
        }
    }
}

thread_local! {
    /// This shard thread's side of its node's resolver (`install`).
    static CURRENT: RefCell<Option<Rc<ShardResolver>>> = const { RefCell::new(None) };
}

/// Makes `node` the resolver `current` uses on this thread (each shard thread, at start).
pub fn install(node: Arc<Resolver>) {
    CURRENT.with(|current| *current.borrow_mut() = Some(Rc::new(ShardResolver::new(node))));
}

/// This thread's resolver, if one was installed (every shard thread has one).
pub fn current() -> Option<Rc<ShardResolver>> {
    CURRENT.with(|current| current.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn config(timeout_ms: u64, cache_ttl_ms: u64) -> Config {
        let mut config = Config::default();
        config.webhooks.dns_timeout_ms = timeout_ms;
        config.webhooks.dns_cache_ttl_ms = cache_ttl_ms;
        config.webhooks.dns_threads = 2;
        let hook = |host: &str| crate::config::WebhookConfig {
            id: Some(host.replace('.', "-")),
            ..crate::config::WebhookConfig::pusher(format!("http://{host}/"))
        };
        config.apps[0].webhooks = vec![hook("ok.test"), hook("hang.test"), hook("nx.test")];
        config
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap().block_on(future)
    }

    /// A lookup that answers 127.0.0.1 for `ok.test`, hangs until the test ends for
    /// `hang.test` (counting both), and fails for anything else.
    fn counting_lookup() -> (Lookup, Arc<AtomicUsize>, Arc<AtomicUsize>, crossbeam::channel::Sender<()>) {
        let (ok, hung) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, released) = crossbeam::channel::bounded::<()>(0);
        let (ok2, hung2) = (ok.clone(), hung.clone());
        let lookup: Lookup = Arc::new(move |host: &str| match host {
            "ok.test" => {
                ok2.fetch_add(1, Ordering::SeqCst);
                Ok(vec![IpAddr::from([127, 0, 0, 1])])
            }
            "hang.test" => {
                hung2.fetch_add(1, Ordering::SeqCst);
                let _ = released.recv();
                Err(io::Error::other("released"))
            }
            _ => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
        });
        (lookup, ok, hung, release)
    }

    /// A hanging host: every wait times out with the documented message and leaves no waker
    /// behind, yet only one lookup (one thread) is ever spent on it, even by two shards; another
    /// host still resolves meanwhile.
    #[test]
    fn hanging_lookup_times_out_and_occupies_one_thread() {
        let (lookup, _, hung, _release) = counting_lookup();
        let node = Arc::new(Resolver::new(&config(50, 0), lookup).unwrap());
        let (shard_a, shard_b) = (Rc::new(ShardResolver::new(node.clone())), Rc::new(ShardResolver::new(node)));
        block_on(async {
            for shard in [&shard_a, &shard_b, &shard_a] {
                let error = shard.resolve("hang.test", 80).await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                assert_eq!(error.to_string(), "DNS lookup of hang.test timed out after 50 ms");
            }
            assert_eq!(shard_a.resolve("ok.test", 8080).await.unwrap(), [SocketAddr::from(([127, 0, 0, 1], 8080))]);
        });
        assert_eq!(hung.load(Ordering::SeqCst), 1, "one lookup in flight per host, node-wide");
        assert!(shard_a.flights.borrow()["hang.test"].waiters.borrow().is_empty(), "timed-out waiters left");
    }

    /// Answers are cached for the TTL (one lookup for many resolves), not at all with TTL 0;
    /// failures are reported with the lookup's error and never cached.
    #[test]
    fn answers_are_cached_for_the_ttl() {
        let (lookup, ok, _, _release) = counting_lookup();
        let cached =
            Rc::new(ShardResolver::new(Arc::new(Resolver::new(&config(1000, 60_000), lookup.clone()).unwrap())));
        let uncached = Rc::new(ShardResolver::new(Arc::new(Resolver::new(&config(1000, 0), lookup).unwrap())));
        block_on(async {
            for _ in 0..3 {
                cached.resolve("ok.test", 1).await.unwrap();
            }
            assert_eq!(ok.load(Ordering::SeqCst), 1);
            for _ in 0..3 {
                uncached.resolve("ok.test", 1).await.unwrap();
            }
            assert_eq!(ok.load(Ordering::SeqCst), 4);
            let error = cached.resolve("nx.test", 1).await.unwrap_err();
            assert_eq!(error.to_string(), "no such host");
            assert!(!cached.cache.borrow().contains_key("nx.test"));
            assert!(cached.resolve("unknown.test", 1).await.is_err(), "not a configured host");
        });
    }
}
