//! Starting and stopping a node: bind the listeners, start one pinned thread per shard, each
//! with its own monoio runtime, and coordinate shutdown through the mesh.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context};

use crate::apps::Apps;
use crate::cluster::link::LinkOptions;
use crate::cluster::supervisor::SupervisorOptions;
use crate::cluster::NodeIdentity;
use crate::config::{Config, IoDriver};
use crate::metrics::ShardMetrics;
use crate::net::listener;
use crate::net::tls::{Certificates, TlsSettings};
use crate::redis_url::RedisUrl;
use crate::shard::mesh::Mesh;
use crate::shard::Shard;
use crate::webhook::dispatch::Webhooks;
use crate::webhook::resolver::{self, Lookup, Resolver};
use monoio_rustls::TlsConnector;

/// How long a reload waits for every shard to take the new config and apps.
const RELOAD_APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The io driver a shard ended up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring.
    IoUring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

/// Called on each shard's thread, inside its runtime, once the shard is up (its argument is
/// the shard's index). Tests use it to inject faults; `Server::start` passes none.
pub type ShardStartHook = Arc<dyn Fn(usize) + Send + Sync>;

/// A running node.
pub struct Server {
    /// The address every shard listens on.
    pub addr: SocketAddr,
    /// The TLS listener's address, when `[tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The driver of each shard.
    pub drivers: Vec<Driver>,
    mesh: Arc<Mesh>,
    threads: Vec<JoinHandle<()>>,
    /// The config the node runs (what a reload compares against); a reload replaces its
    /// apps. Locked only by reloads, on the signal-handling thread, never by a shard.
    config: Mutex<Arc<Config>>,
    /// The apps every shard reads (a reload builds their successor from it).
    apps: Mutex<Arc<Apps>>,
    /// The TLS listener's certificate slot, which a reload swaps.
    certificates: Option<Arc<Certificates>>,
    /// The shards run a webhook dispatcher (some app had an endpoint at start), so a reload
    /// can change endpoints live.
    webhooks_live: bool,
    metrics: Arc<[ShardMetrics]>,
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// New handshakes present the certificate now in the files.
    pub certificates: bool,
    /// `[[apps]]` changed and every shard now serves the new apps: added apps accept
    /// connections, keys, secrets and limits are the new ones.
    pub apps: bool,
    /// Ids of the apps this reload removed (their connections were closed with 4001).
    pub apps_removed: Vec<String>,
    /// Every shard runs the new file's live keys (`config::running_config`): `[http]`,
    /// `[websocket]`, `[dashboard]`, most of `[webhooks]` and some of `[server]` changed.
    pub settings: bool,
    /// Changed sections that take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Server {
    /// Binds and starts every shard; returns once all of them accept connections.
    pub fn start(config: Config) -> anyhow::Result<Server> {
        Server::start_with(config, None)
    }

    /// `start`, running `on_shard_start` on every shard once it is up.
    pub fn start_with(config: Config, on_shard_start: Option<ShardStartHook>) -> anyhow::Result<Server> {
        Server::start_with_lookup(config, on_shard_start, resolver::system_lookup())
    }

    /// `start_with`, resolving webhook hosts with `lookup` instead of the system resolver
    /// (tests use it to make lookups hang or answer locally).
    pub fn start_with_lookup(
        config: Config,
        on_shard_start: Option<ShardStartHook>,
        lookup: Lookup,
    ) -> anyhow::Result<Server> {
        let shards = config.shard_count();
        let (listeners, addr) = listener::bind(config.server.bind, shards, config.server.backlog)
            .with_context(|| format!("cannot listen on {}", config.server.bind))?;
        let (mut tls_listeners, tls_addr, tls_settings, certificates) = match &config.tls {
            None => (Vec::new(), None, None, None),
            Some(tls) => {
                let (server_config, certificates) =
                    crate::net::tls::listener_config(tls).map_err(anyhow::Error::msg)?;
                let settings = TlsSettings {
                    config: server_config,
                    handshake_timeout: std::time::Duration::from_millis(tls.handshake_timeout_ms),
                };
                let (listeners, addr) = listener::bind(tls.bind, shards, config.server.backlog)
                    .with_context(|| format!("cannot listen on {} (tls.bind)", tls.bind))?;
                (listeners, Some(addr), Some(settings), Some(certificates))
            }
        };
        check_wal_directories(&config, shards)?;
        let config = Arc::new(config);
        // One small pool per node for the WAL's blocking file-system calls. DNS lookups, which
        // can hang for as long as a nameserver stays silent, have threads of their own.
        let blocking_pool = monoio::blocking::DefaultThreadPool::new(2);
        let resolver = Arc::new(Resolver::new(&config, lookup).context("cannot start the DNS threads")?);
        let apps = Arc::new(Apps::new(&config.apps));
        let cluster = cluster_options(&config, &apps, shards)?;
        if let Some(options) = &cluster {
            check_cluster_buckets(options)?;
        }
        let webhook_tls = crate::webhook::endpoint::tls_connector(&config).map_err(anyhow::Error::msg)?;
        let mesh = Arc::new(Mesh::new(shards, config.mesh.ring_capacity));
        let metrics: Arc<[ShardMetrics]> = (0..shards).map(|_| ShardMetrics::default()).collect();
        if cluster.is_some() {
            // Not ready until each shard's supervisor has subscribed its buckets and says so:
            // a node that answered 200 before would take clients whose events it cannot see yet.
            for shard in metrics.iter() {
                shard.cluster_link_down.store(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // Shard i is pinned to the i-th CPU this process may run on (its cpuset), round robin:
        // in a cpuset such as {2, 3}, `i % parallelism` would name CPUs outside it.
        let cpus = crate::doctor::host::cpus_allowed();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Driver, String>>();
        let mut threads = Vec::with_capacity(shards);
        for (index, plain) in listeners.into_iter().enumerate() {
            let tls_listener = match (tls_listeners.is_empty(), &tls_settings) {
                (false, Some(settings)) => Some((tls_listeners.remove(0), settings.clone())),
                _ => None,
            };
            let listeners = ShardListeners { plain, tls: tls_listener };
            let (config, apps, mesh, metrics, ready) =
                (config.clone(), apps.clone(), mesh.clone(), metrics.clone(), ready_tx.clone());
            let pool = blocking_pool.clone();
            let resolver = resolver.clone();
            let hook = on_shard_start.clone();
            let webhook_tls = webhook_tls.clone();
            let cpus = cpus.clone();
            let cluster = cluster.clone().map(|options| SupervisorOptions { shard: index, ..options });
            let thread = std::thread::Builder::new()
                .name(format!("ringwire-shard-{index}"))
                .spawn(move || {
                    let _guard = ShardGuard { index, metrics: metrics.clone(), mesh: mesh.clone() };
                    resolver::install(resolver);
                    let cpu = pinned_cpu(&cpus, index);
                    if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                        tracing::warn!(shard = index, error = ?e, "could not pin the shard to its CPU");
                    }
                    let shard = Shard::new(index, config.clone(), apps, mesh, metrics);
                    let extras = ShardExtras { hook, webhook_tls, cluster };
                    run_shard(shard, listeners, config.server.io_driver, pool, ready, extras);
                })
                .context("cannot start a shard thread")?;
            threads.push(thread);
        }
        drop(ready_tx);
        let mut drivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(driver)) => drivers.push(driver),
                Ok(Err(message)) => {
                    mesh.shutdown();
                    bail!(message)
                }
                Err(_) => {
                    mesh.shutdown();
                    bail!("a shard thread died while starting")
                }
            }
        }
        let webhooks_live = config.apps.iter().any(|app| !app.webhooks.is_empty());
        let (config, apps) = (Mutex::new(config), Mutex::new(apps));
        Ok(Server { addr, tls_addr, drivers, mesh, threads, config, apps, certificates, webhooks_live, metrics })
    }

    /// Applies a new, already validated config to the running node (SIGHUP): the TLS
    /// certificate and key are read again and served from the next handshake on, while open
    /// connections keep theirs; the live keys (`config::running_config`), `[[apps]]` and their
    /// webhook endpoints are swapped on every shard (see `apply_on_shards`). Keys that need a
    /// restart are named in `needs_restart` and keep their running values. On an error nothing
    /// changes (the certificate is read before anything is swapped). Counted in
    /// `ringwire_config_reloads_total` and `ringwire_config_reload_failures_total`.
    pub fn reload(&self, new: &Config) -> Result<Reloaded, String> {
        let result = self.apply(new);
        let counter = match result {
            Ok(_) => &self.metrics[0].config_reloads_total,
            Err(_) => &self.metrics[0].config_reload_failures_total,
        };
        ShardMetrics::add(counter, 1);
        result
    }

    /// Counts a reload refused before it reached `reload` (the file did not validate).
    pub fn reload_refused(&self) {
        ShardMetrics::add(&self.metrics[0].config_reload_failures_total, 1);
    }

    fn apply(&self, new: &Config) -> Result<Reloaded, String> {
        let mut config = self.config.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = config.clone();
        let mut reloaded = Reloaded::default();
        // Read first, off the shards (the CA file is blocking file I/O), so that a bad CA file
        // refuses the reload before anything is swapped. `webhooks.ca_file` needs a restart:
        // the running one serves the new endpoints.
        let webhook_tls = match self.webhooks_live {
            true => crate::webhook::endpoint::tls_connector(&Config { apps: new.apps.clone(), ..(*old).clone() })?,
            false => None,
        };
        match (&self.certificates, &new.tls) {
            (Some(certificates), Some(tls)) => {
                certificates.reload(tls)?;
                reloaded.certificates = true;
            }
            (None, None) => {}
            _ => reloaded.needs_restart.push("tls"),
        }
        let bind_changed = |o: &Config, n: &Config| o.tls.as_ref().map(|t| t.bind) != n.tls.as_ref().map(|t| t.bind);
        if reloaded.certificates && bind_changed(&old, new) {
            reloaded.needs_restart.push("tls.bind");
        }
        let (mut running, restart) = crate::config::running_config(&old, new);
        reloaded.needs_restart.extend(restart);
        reloaded.settings = running != *old;
        let mut apps = self.apps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next_apps = apps.clone();
        if old.apps != new.apps {
            let (next, change) = apps.reloaded(&new.apps, self.webhooks_live);
            if old.cluster.redis_url.is_some() {
                // docs/cluster.md: an app's buckets are subscribed on every shard before any
                // shard serves it, so its first clients miss nothing other nodes publish.
                let added: Vec<(crate::apps::AppIndex, String)> = next
                    .list
                    .iter()
                    .filter(|app| !app.removed && apps.list.get(app.index as usize).is_none_or(|old| old.removed))
                    .map(|app| (app.index, app.config.id.clone()))
                    .collect();
                if !added.is_empty() {
                    self.subscribe_apps(&added, std::time::Instant::now() + RELOAD_APPLY_TIMEOUT)?;
                }
            }
            reloaded.apps = true;
            reloaded.apps_removed = change.removed.iter().map(|&i| next.get(i).config.id.clone()).collect();
            reloaded.needs_restart.extend(change.needs_restart);
            running.apps = next.list.iter().filter(|app| !app.removed).map(|app| app.config.clone()).collect();
            next_apps = Arc::new(next);
        }
        if !reloaded.settings && !reloaded.apps {
            return Ok(reloaded);
        }
        let running = Arc::new(running);
        let sent = self.apply_on_shards(&running, &next_apps, webhook_tls);
        // Once sent, every shard applies it (if late, when it drains its ring): what runs is new.
        if !matches!(sent, Err(Unsent::Ring(_))) {
            *apps = next_apps;
            *config = running;
        }
        sent.map_err(|e| e.to_string())?;
        Ok(reloaded)
    }

    /// Sends the reload to every shard through the mesh (the only way work crosses threads)
    /// and waits until each has applied it.
    fn apply_on_shards(
        &self,
        config: &Arc<Config>,
        apps: &Arc<Apps>,
        webhook_tls: Option<TlsConnector>,
    ) -> Result<(), Unsent> {
        let deadline = std::time::Instant::now() + RELOAD_APPLY_TIMEOUT;
        let (done, applied) = mpsc::channel();
        for shard in 0..self.mesh.shards() {
            let reload = crate::shard::reload::Reload {
                config: config.clone(),
                apps: apps.clone(),
                webhook_tls: webhook_tls.clone(),
                done: done.clone(),
            };
            let mut message = crate::shard::mesh::MeshMessage::Reload(Box::new(reload));
            // Counted as sent for shutdown's quiescence check, which pairs every handled
            // message with a sent one.
            self.mesh.count_sent(shard);
            while let Err(back) = self.mesh.try_send(shard, message) {
                if std::time::Instant::now() > deadline || self.mesh.is_shutting_down() {
                    return Err(Unsent::Ring(shard));
                }
                // Not a shard thread: a short sleep while the shard drains its ring is fine.
                std::thread::sleep(std::time::Duration::from_millis(1));
                message = back;
            }
        }
        for _ in 0..self.mesh.shards() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if applied.recv_timeout(left).is_err() {
                return Err(Unsent::Late);
            }
        }
        Ok(())
    }

    /// Cluster mode: has every shard's link supervisor subscribe (and baseline) its buckets of
    /// the `added` apps, and waits until all have; an error (a link down) reloads nothing.
    fn subscribe_apps(
        &self,
        added: &[(crate::apps::AppIndex, String)],
        deadline: std::time::Instant,
    ) -> Result<(), String> {
        let (done, subscribed) = mpsc::channel();
        for shard in 0..self.mesh.shards() {
            let mut message = crate::shard::mesh::MeshMessage::ClusterApps { apps: added.to_vec(), done: done.clone() };
            self.mesh.count_sent(shard);
            while let Err(back) = self.mesh.try_send(shard, message) {
                if std::time::Instant::now() > deadline || self.mesh.is_shutting_down() {
                    return Err(format!("apps: shard {shard}'s mesh ring stayed full; the apps were not reloaded"));
                }
                // Not a shard thread: a short sleep while the shard drains its ring is fine.
                std::thread::sleep(std::time::Duration::from_millis(1));
                message = back;
            }
        }
        for _ in 0..self.mesh.shards() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match subscribed.recv_timeout(left) {
                Ok(Ok(_)) => {}
                Ok(Err(shard)) => {
                    return Err(format!(
                        "apps: shard {shard}'s link to redis is down, so the added apps' buckets are not \
                         subscribed; the apps were not reloaded (reload again once /ready answers 200; \
                         if it is up, an earlier failed reload left another app there: restart)"
                    ))
                }
                Err(_) => return Err("apps: the added apps' buckets were not subscribed in time; not reloaded".into()),
            }
        }
        Ok(())
    }

    /// Begins graceful shutdown on every shard (returns at once).
    pub fn shutdown(&self) {
        self.mesh.shutdown();
    }

    /// Waits for every shard to finish.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Why a reload did not reach every shard in time.
#[derive(Debug, thiserror::Error)]
enum Unsent {
    /// A shard's ring stayed full: shards before it took the reload, it and those after did
    /// not (a reload of the same file again sends it whole).
    #[error("shard {0}'s mesh ring stayed full; the config was not reloaded on it")]
    Ring(usize),
    /// Sent everywhere, but some shard has not applied it yet; it will when it drains its ring.
    #[error("a shard did not apply the reload in time; it will when it drains its ring")]
    Late,
}

/// The CPU shard `index` is pinned to: the `index`-th of the CPUs this process may run on,
/// round robin (`index` itself when the affinity mask could not be read).
fn pinned_cpu(allowed: &[usize], index: usize) -> usize {
    if allowed.is_empty() {
        index
    } else {
        allowed[index % allowed.len()]
    }
}

/// A shard's listening sockets: the plain one, and the TLS one with its settings.
struct ShardListeners {
    plain: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, TlsSettings)>,
}

/// What a shard starts besides its listeners.
struct ShardExtras {
    hook: Option<ShardStartHook>,
    webhook_tls: Option<TlsConnector>,
    /// Cluster mode: this shard's link supervisor's options.
    cluster: Option<SupervisorOptions>,
}

/// Refuses to start a node whose `cluster.buckets` differs from the one the nodes sharing its
/// Redis use (docs/cluster.md, "Fan-out"). Runs on a thread of its own with a small runtime
/// (start-up may block; no shard runs yet). Redis unreachable at start is no error: each
/// shard's link checks again whenever it connects, and stays down on a mismatch.
fn check_cluster_buckets(options: &SupervisorOptions) -> anyhow::Result<()> {
    let options = options.clone();
    let checked = std::thread::spawn(move || {
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map_err(crate::cluster::link::LinkError::Io)?;
        runtime.block_on(async {
            let mut link = crate::cluster::link::Link::connect(options.address, &options.link).await?;
            crate::cluster::supervisor::check_buckets(&mut link, &options.prefix, options.buckets).await
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the cluster.buckets check panicked"))?;
    match checked {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(anyhow::anyhow!(reason)),
        Err(error) => {
            tracing::warn!(%error, "cannot check cluster.buckets in redis at start; each link checks it when it connects");
            Ok(())
        }
    }
}

/// Cluster mode's per-node settings (`shard` 0, to be set per shard), or `None` on a single
/// node. Resolves the Redis host here, before any shard runs (resolution blocks), and draws the
/// node's identity (docs/cluster.md, "Message format").
fn cluster_options(config: &Config, apps: &Apps, shards: usize) -> anyhow::Result<Option<SupervisorOptions>> {
    let cluster = &config.cluster;
    let Some(url) = &cluster.redis_url else { return Ok(None) };
    let url = RedisUrl::parse(url).map_err(|reason| anyhow::anyhow!("cluster.redis_url: {reason}"))?;
    let address = url.resolve().with_context(|| format!("cluster.redis_url: cannot resolve {}", url.host))?;
    let node = NodeIdentity::new(cluster.node_id.as_deref(), &mut fastrand::Rng::new());
    tracing::info!(node_id = %node.node_id, incarnation = format!("{:016x}", node.incarnation), %address,
        "cluster mode");
    Ok(Some(SupervisorOptions {
        address,
        link: LinkOptions::new(cluster, &url),
        prefix: cluster.prefix.clone(),
        apps: apps.list.iter().map(|app| (app.index, app.config.id.clone())).collect(),
        buckets: u16::try_from(cluster.buckets).context("cluster.buckets is at most 4096")?,
        shards,
        shard: 0,
        senders_max: cluster.senders_max,
        node,
    }))
}

/// Builds the shard's runtime on the configured driver and runs it to shutdown.
fn run_shard(
    shard: Shard,
    listener: ShardListeners,
    driver: IoDriver,
    pool: monoio::blocking::DefaultThreadPool,
    ready: mpsc::Sender<Result<Driver, String>>,
    extras: ShardExtras,
) {
    let index = shard.index;
    if driver != IoDriver::Epoll {
        let builder = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .enable_timer()
            .attach_thread_pool(Box::new(pool.clone()));
        match builder.build() {
            Ok(mut runtime) => return runtime.block_on(shard_main(shard, listener, Driver::IoUring, ready, extras)),
            Err(e) if driver == IoDriver::IoUring => {
                let _ = ready.send(Err(format!(
                    "shard {index}: io_uring is unavailable ({e}) and server.io_driver = \"io_uring\""
                )));
                return;
            }
            Err(e) => {
                tracing::warn!(shard = index, error = %e, "io_uring is unavailable; falling back to epoll")
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .attach_thread_pool(Box::new(pool))
        .build()
    {
        Ok(mut runtime) => runtime.block_on(shard_main(shard, listener, Driver::Epoll, ready, extras)),
        Err(e) => {
            let _ = ready.send(Err(format!("shard {index}: cannot build an epoll runtime: {e}")));
        }
    }
}

/// A shard's life inside its runtime: accept until shutdown, then shut down in order
/// (connections, home effects on every shard, WAL commit).
async fn shard_main(
    shard: Shard,
    listeners: ShardListeners,
    driver: Driver,
    ready: mpsc::Sender<Result<Driver, String>>,
    extras: ShardExtras,
) {
    let ShardExtras { hook, webhook_tls, cluster } = extras;
    let register = |listener| monoio::net::TcpListener::from_std(listener);
    let tls = listeners.tls.map(|(listener, settings)| register(listener).map(|l| (l, settings))).transpose();
    let (listener, tls) = match (register(listeners.plain), tls) {
        (Ok(listener), Ok(tls)) => (listener, tls),
        (Err(e), _) | (_, Err(e)) => {
            let _ = ready.send(Err(format!("shard {}: cannot register the listener: {e}", shard.index)));
            return;
        }
    };
    let shard = Rc::new(shard);
    // Recover the webhook queue before accepting anything, so deliveries resume in order.
    match Webhooks::open(shard.index, (*shard.config()).clone(), &shard.apps(), shard.all_metrics.clone(), webhook_tls)
        .await
    {
        Ok(Some(webhooks)) => {
            webhooks.spawn();
            let _ = shard.webhooks_cell.set(webhooks);
        }
        Ok(None) => {}
        Err(message) => {
            let _ = ready.send(Err(format!("shard {}: {message}", shard.index)));
            return;
        }
    }
    shard.spawn_background();
    // The link comes up in the background; /ready answers 503 until it has.
    if let Some(options) = cluster {
        shard.start_cluster(options);
    }
    let _ = ready.send(Ok(driver));
    if let Some(hook) = hook {
        hook(shard.index);
    }
    let tls_loop =
        tls.map(|(listener, settings)| monoio::spawn(listener::accept_loop(shard.clone(), listener, Some(settings))));
    listener::accept_loop(shard.clone(), listener, None).await;
    if let Some(tls_loop) = tls_loop {
        tls_loop.await;
    }
    shard.shut_down_in_order().await;
}

/// Lives as long as a shard's thread. A shard that panics holds connections, channels and
/// webhook state no other shard can take over, and its peers would wait for it forever (a
/// publish waits for its mesh messages): so its death is marked for `/health` and
/// `/metrics` (`ringwire_shard_down`), logged, and the whole node is stopped, never left
/// running as a zombie. The binary aborts even sooner, in `abort_on_panic`'s hook.
struct ShardGuard {
    index: usize,
    metrics: Arc<[ShardMetrics]>,
    mesh: Arc<Mesh>,
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.metrics[self.index].shard_down.store(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                shard = self.index,
                "shard panicked: stopping the node (the webhook log makes a restart safe)"
            );
            self.mesh.shutdown();
        }
    }
}

/// Makes any panic, on any thread, abort the process after its message and one line that
/// says why: a node with a dead shard cannot serve (see `ShardGuard`), and a supervisor
/// restarting it is the safe recovery (accepted webhooks are in the WAL). The binary calls
/// this first thing.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        eprintln!(
            "ringwire: fatal: thread {thread} panicked (a bug; please report it); aborting so that a supervisor \
             restarts the node — accepted webhooks are safe in the WAL"
        );
        std::process::abort();
    }));
}

/// Refuses to start when the webhook data directory holds logs of shards this run would not
/// have: their deliveries would never be sent.
fn check_wal_directories(config: &Config, shards: usize) -> anyhow::Result<()> {
    let has_webhooks = config.apps.iter().any(|a| !a.webhooks.is_empty());
    if !has_webhooks || config.webhooks.durability == crate::config::DurabilityMode::Memory {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(&config.webhooks.data_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = crate::webhook::wal_directory_shard(&name) else { continue };
        let holds_segments = std::fs::read_dir(entry.path())
            .map(|d| d.flatten().any(|f| f.file_name().to_string_lossy().ends_with(".wal")))
            .unwrap_or(false);
        if index >= shards && holds_segments {
            bail!(
                "webhooks.data_dir {} holds the log of shard {index}, but this run has {shards} shards: \
                 start with server.shards = {} until its deliveries drain",
                config.webhooks.data_dir.display(),
                index + 1
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards pin inside the process's cpuset, round robin, whatever CPU numbers it holds.
    #[test]
    fn shards_pin_inside_the_cpuset() {
        assert_eq!((0..4).map(|i| pinned_cpu(&[2, 3], i)).collect::<Vec<_>>(), [2, 3, 2, 3]);
        assert_eq!((0..3).map(|i| pinned_cpu(&[0, 5, 9], i)).collect::<Vec<_>>(), [0, 5, 9]);
        assert_eq!(pinned_cpu(&[], 7), 7);
    }
}
