//! Host-name lookups for webhook targets, on the node's own DNS threads.
//!
//! A blocking `getaddrinfo` cannot be cancelled, and a domain whose nameservers never answer
//! holds its thread for as long as the system resolver retries (or forever, for a lookup
//! that hangs). So the whole failure is bounded here, not only the waiting side:
//! - lookups run on `webhooks.dns_threads` threads of their own, never on the runtime's
//!   blocking pool, so a stuck lookup cannot delay the WAL's file-system calls there;
//! - one lookup per host is in flight node-wide: every attempt that needs the same host
//!   waits for that lookup (single flight), so one dead domain occupies at most one thread;
//! - each wait ends after `webhooks.dns_timeout_ms` with a retryable
//!   "DNS lookup of HOST timed out after N ms" (the lookup itself may go on; its answer is
//!   still cached when it comes);
//! - successful answers are cached for `webhooks.dns_cache_ttl_ms` (0: not cached). The SSRF
//!   guard vets every address at each connect, cached or not.
//!
//! The lookup function is passed in (`Server::start_with_lookup`): production uses the
//! system resolver, tests one that hangs for chosen hosts.
//!
//! Invariant: the flight and cache maps are keyed by host names from the config, so they
//! hold at most one entry per distinct configured webhook host.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::WebhooksConfig;

/// A blocking host-name lookup. It runs on the resolver's threads and may block as long as
/// it likes; the resolver bounds what that costs.
pub type Lookup = Arc<dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// The system resolver (`getaddrinfo`, through the standard library).
pub fn system_lookup() -> Lookup {
    Arc::new(|host: &str| Ok((host, 0).to_socket_addrs()?.map(|a| a.ip()).collect()))
}

/// What a finished lookup produced: the addresses, or the error's text.
type Answer = Result<Arc<[IpAddr]>, String>;

/// One lookup in flight, awaited by every attempt that needs its host.
#[derive(Default)]
struct Flight {
    slot: Mutex<FlightSlot>,
}

#[derive(Default)]
struct FlightSlot {
    answer: Option<Answer>,
    /// Waiting tasks; each removes its own entry when it stops waiting (timeout included),
    /// so a lookup that never ends does not collect wakers.
    waiters: slab::Slab<Waker>,
}

/// State shared by the shards and the DNS threads. Locked once per lookup request (not per
/// message), only for map operations: nothing blocks or awaits while holding it.
struct Shared {
    lookup: Lookup,
    cache_ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    flights: HashMap<String, Arc<Flight>>,
    cache: HashMap<String, (Instant, Arc<[IpAddr]>)>,
}

/// A node's resolver: its DNS threads, flights and cache. Shards share it (`Arc`); its
/// threads end once it is dropped and their current lookup returns.
pub struct Resolver {
    shared: Arc<Shared>,
    jobs: crossbeam::channel::Sender<(String, Arc<Flight>)>,
    timeout: Duration,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section is a single map or slot update).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Resolver {
    /// Starts `webhooks.dns_threads` lookup threads running `lookup`.
    pub fn new(settings: &WebhooksConfig, lookup: Lookup) -> io::Result<Resolver> {
        let shared = Arc::new(Shared {
            lookup,
            cache_ttl: Duration::from_millis(settings.dns_cache_ttl_ms),
            state: Mutex::new(State::default()),
        });
        // Unbounded, yet bounded in practice: single flight allows one queued job per
        // distinct configured host.
        let (jobs, queue) = crossbeam::channel::unbounded::<(String, Arc<Flight>)>();
        for index in 0..settings.dns_threads {
            let (shared, queue) = (shared.clone(), queue.clone());
            std::thread::Builder::new().name(format!("ringwire-dns-{index}")).spawn(move || {
                for (host, flight) in queue {
                    shared.run(&host, &flight);
                }
            })?;
        }
        Ok(Resolver { shared, jobs, timeout: Duration::from_millis(settings.dns_timeout_ms) })
    }

    /// The addresses of `host` with `port`, from the cache or a lookup; an error (retryable)
    /// when the lookup fails or does not answer within `webhooks.dns_timeout_ms`.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let flight = {
            let mut state = lock(&self.shared.state);
            if let Some((at, addresses)) = state.cache.get(host) {
                if at.elapsed() < self.shared.cache_ttl {
                    return Ok(addresses.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
                }
            }
            match state.flights.get(host) {
                Some(flight) => flight.clone(),
                None => {
                    let flight = Arc::new(Flight::default());
                    state.flights.insert(host.to_string(), flight.clone());
                    if self.jobs.send((host.to_string(), flight.clone())).is_err() {
                        state.flights.remove(host);
                        return Err(io::Error::other("the DNS threads have stopped"));
                    }
                    flight
                }
            }
        };
        match monoio::time::timeout(self.timeout, Wait { flight, waiter: None }).await {
            Ok(Ok(addresses)) => Ok(addresses.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            Ok(Err(message)) => Err(io::Error::other(message)),
            Err(_elapsed) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("DNS lookup of {host} timed out after {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

impl Shared {
    /// Runs one lookup on a DNS thread and hands its answer to every waiter.
    fn run(&self, host: &str, flight: &Flight) {
        let answer: Answer = match (self.lookup)(host) {
            Ok(addresses) if addresses.is_empty() => Err(format!("{host} has no addresses")),
            Ok(addresses) => Ok(addresses.into()),
            Err(e) => Err(e.to_string()),
        };
        {
            let mut state = lock(&self.state);
            state.flights.remove(host);
            match &answer {
                Ok(addresses) if !self.cache_ttl.is_zero() => {
                    state.cache.insert(host.to_string(), (Instant::now(), addresses.clone()));
                }
                _ => {}
            }
        }
        let waiters = {
            let mut slot = lock(&flight.slot);
            slot.answer = Some(answer);
            std::mem::take(&mut slot.waiters)
        };
        for (_, waker) in waiters {
            waker.wake();
        }
    }
}

/// Waits for a flight's answer; leaves the flight's waiter list when dropped.
struct Wait {
    flight: Arc<Flight>,
    waiter: Option<usize>,
}

impl Future for Wait {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let this = &mut *self;
        let mut slot = lock(&this.flight.slot);
        if let Some(answer) = &slot.answer {
            return Poll::Ready(answer.clone());
        }
        match this.waiter {
            Some(key) if slot.waiters.contains(key) => slot.waiters[key].clone_from(cx.waker()),
            _ => this.waiter = Some(slot.waiters.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(key) = self.waiter.take() {
            let mut slot = lock(&self.flight.slot);
            if slot.waiters.contains(key) {
                slot.waiters.remove(key);
            }
        }
    }
}

thread_local! {
    /// The resolver of the node this shard thread belongs to (`install`).
    static CURRENT: RefCell<Option<Arc<Resolver>>> = const { RefCell::new(None) };
}

/// Makes `resolver` the one `current` returns on this thread (each shard thread, at start).
pub fn install(resolver: Arc<Resolver>) {
    CURRENT.with(|current| *current.borrow_mut() = Some(resolver));
}

/// This thread's resolver; outside a server (unit tests), one shared resolver with the
/// default settings and the system lookup.
pub fn current() -> Arc<Resolver> {
    static FALLBACK: OnceLock<Arc<Resolver>> = OnceLock::new();
    CURRENT.with(|current| current.borrow().clone()).unwrap_or_else(|| {
        FALLBACK
            .get_or_init(|| {
                Arc::new(Resolver::new(&WebhooksConfig::default(), system_lookup()).expect("cannot start a DNS thread"))
            })
            .clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings(timeout_ms: u64, cache_ttl_ms: u64) -> WebhooksConfig {
        WebhooksConfig {
            dns_timeout_ms: timeout_ms,
            dns_threads: 2,
            dns_cache_ttl_ms: cache_ttl_ms,
            ..Default::default()
        }
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

    /// A hanging host: every wait times out with the documented message, yet only one lookup
    /// (one thread) is ever spent on it, and another host still resolves meanwhile.
    #[test]
    fn hanging_lookup_times_out_and_occupies_one_thread() {
        let (lookup, _, hung, _release) = counting_lookup();
        let resolver = Resolver::new(&settings(50, 0), lookup).unwrap();
        block_on(async {
            for _ in 0..3 {
                let error = resolver.resolve("hang.test", 80).await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                assert_eq!(error.to_string(), "DNS lookup of hang.test timed out after 50 ms");
            }
            assert_eq!(resolver.resolve("ok.test", 8080).await.unwrap(), [SocketAddr::from(([127, 0, 0, 1], 8080))]);
        });
        assert_eq!(hung.load(Ordering::SeqCst), 1, "one lookup in flight per host");
        let state = lock(&resolver.shared.state);
        assert!(state.flights["hang.test"].slot.lock().unwrap().waiters.is_empty(), "timed-out waiters left");
    }

    /// Answers are cached for the TTL (one lookup for many resolves), not at all with TTL 0;
    /// failures are reported with the lookup's error and never cached.
    #[test]
    fn answers_are_cached_for_the_ttl() {
        let (lookup, ok, _, _release) = counting_lookup();
        let cached = Resolver::new(&settings(1000, 60_000), lookup.clone()).unwrap();
        let uncached = Resolver::new(&settings(1000, 0), lookup).unwrap();
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
            assert!(!lock(&cached.shared.state).cache.contains_key("nx.test"));
        });
    }
}
