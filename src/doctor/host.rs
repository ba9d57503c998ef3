//! The host facts `doctor` judges, gathered once from the real machine.
//!
//! Gathering is the only part of `doctor` that touches the host: it reads `/proc/sys`, calls
//! `getrlimit`, `sched_getaffinity`, `statfs` and `uname`, builds one io_uring runtime the way a
//! shard does, creates and removes one probe file in the data directory, and opens one TCP
//! connection to Redis when cluster mode is configured. The checks in `doctor::checks` are pure
//! functions of these facts, so tests feed them controlled hosts.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, DurabilityMode};

/// Everything `doctor` knows about the host; `None` where the kernel does not expose a fact.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// `uname -r`, e.g. `6.1.0-18-amd64`.
    pub kernel_release: String,
    /// Whether an io_uring runtime could be built, as a shard builds it.
    pub io_uring: Result<(), Refusal>,
    /// `kernel.io_uring_disabled` (Linux 6.6+): 0 allowed, 1 only for `kernel.io_uring_group`,
    /// 2 disabled.
    pub io_uring_disabled: Option<u64>,
    /// `RLIMIT_NOFILE` of this process.
    pub fd_limit: Limit,
    /// `RLIMIT_MEMLOCK` of this process, in bytes.
    pub memlock_limit: Limit,
    /// `net.core.somaxconn`: the kernel's cap on every listen backlog.
    pub somaxconn: Option<u64>,
    /// `fs.file-max`: open files on the whole system.
    pub file_max: Option<u64>,
    /// `fs.nr_open`: the highest `RLIMIT_NOFILE` any process may get.
    pub nr_open: Option<u64>,
    /// `net.ipv4.ip_local_port_range`: the ports outbound connections are bound to.
    pub local_ports: Option<(u16, u16)>,
    /// CPUs this process may run on (`sched_getaffinity`), ascending.
    pub cpus_allowed: Vec<usize>,
    /// `std::thread::available_parallelism`: the allowed CPUs, less a cgroup CPU quota. The
    /// server starts this many shards for `server.shards = 0` and pins shard i to CPU
    /// `i % parallelism`.
    pub parallelism: usize,
    /// The webhook data directory, when the config writes one (webhooks with disk durability).
    pub data_dir: Option<DataDir>,
    /// The TLS files the config names, with whether each could be read.
    pub tls_files: Vec<TlsFile>,
    /// The TCP connect to `cluster.redis_url`, when it is set: the address reached, or why not.
    pub redis: Option<Result<SocketAddr, String>>,
}

/// Why a system call refused: the OS error number (if any) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `errno`, e.g. `libc::EPERM`.
    pub errno: Option<i32>,
    /// The error as the OS describes it.
    pub message: String,
}

/// A resource limit (`getrlimit`); `u64::MAX` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What the process gets now.
    pub soft: u64,
    /// What it may raise the soft limit to without privileges.
    pub hard: u64,
}

/// The webhook data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    /// `webhooks.data_dir` as configured.
    pub path: PathBuf,
    /// Whether the server can use it.
    pub access: DirAccess,
    /// The filesystem it is (or would be created) on.
    pub filesystem: Filesystem,
}

/// What the server could do with the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirAccess {
    /// It exists and a file could be created in it.
    Writable,
    /// It does not exist, and `ancestor`, its closest existing ancestor, accepts new entries.
    Creatable {
        /// The directory it would be created under.
        ancestor: PathBuf,
    },
    /// It cannot be used; the reason names the path that refused.
    Unusable {
        /// What went wrong, e.g. `cannot create a file in /x: Permission denied`.
        reason: String,
    },
}

/// Filesystems whose durability differs from a disk's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    /// Memory only: fdatasync returns at once and a reboot loses everything.
    Tmpfs,
    /// A container's writable layer: gone with the container.
    Overlay,
    /// Anything else (`statfs` magic number), assumed to honour fdatasync.
    Other(i64),
    /// `statfs` failed.
    Unknown,
}

/// A TLS file named by the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFile {
    /// The config key, e.g. `webhooks.ca_file`.
    pub key: &'static str,
    /// The path it names.
    pub path: PathBuf,
    /// Bytes read, or why it could not be read.
    pub readable: Result<u64, String>,
}

/// `statfs` magic numbers, from Linux's include/uapi/linux/magic.h.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

impl Host {
    /// Gathers the facts of this machine that matter to `config`.
    pub fn gather(config: &Config) -> Host {
        Host {
            kernel_release: kernel_release(),
            io_uring: probe_io_uring(),
            io_uring_disabled: read_sysctl("kernel/io_uring_disabled"),
            fd_limit: rlimit(libc::RLIMIT_NOFILE),
            memlock_limit: rlimit(libc::RLIMIT_MEMLOCK),
            somaxconn: read_sysctl("net/core/somaxconn"),
            file_max: read_sysctl("fs/file-max"),
            nr_open: read_sysctl("fs/nr_open"),
            local_ports: local_ports(),
            cpus_allowed: cpus_allowed(),
            parallelism: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            data_dir: data_dir_in_use(config).then(|| inspect_data_dir(&config.webhooks.data_dir)),
            tls_files: tls_files(config).into_iter().map(|(key, path)| inspect_tls_file(key, path)).collect(),
            redis: config.cluster.redis_url.as_deref().map(|url| connect_redis(url, config.cluster.connect_timeout_ms)),
        }
    }
}

/// Whether the server writes `webhooks.data_dir`: some app has webhooks and the durability
/// mode keeps them on disk.
pub fn data_dir_in_use(config: &Config) -> bool {
    config.apps.iter().any(|app| !app.webhooks.is_empty()) && config.webhooks.durability != DurabilityMode::Memory
}

/// The TLS files a config names, with their keys: the webhook client's extra CA, and the TLS
/// listener's certificate chain and private key.
pub fn tls_files(config: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut files: Vec<(&'static str, PathBuf)> =
        config.webhooks.ca_file.iter().map(|path| ("webhooks.ca_file", path.clone())).collect();
    if let Some(tls) = &config.tls {
        files.push(("tls.cert_file", tls.cert_file.clone()));
        files.push(("tls.key_file", tls.key_file.clone()));
    }
    files
}

/// Builds an io_uring runtime exactly as `server::run_shard` does, so the answer is the one
/// `io_driver = "auto"` will get, whatever refuses it (kernel, sysctl, seccomp, memlock).
fn probe_io_uring() -> Result<(), Refusal> {
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(1024).enable_timer().build() {
        Ok(_runtime) => Ok(()),
        Err(e) => Err(Refusal { errno: e.raw_os_error(), message: e.to_string() }),
    }
}

fn read_sysctl(name: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name)).ok()?.trim().parse().ok()
}

fn local_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Some((low, high)),
        _ => None,
    }
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Limit {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into the struct it is given, which lives for the call.
    let result = unsafe { libc::getrlimit(resource, &mut limit) };
    if result != 0 {
        return Limit { soft: u64::MAX, hard: u64::MAX };
    }
    // rlim_t is u64 on Linux; RLIM_INFINITY maps to u64::MAX either way.
    let widen = |value: libc::rlim_t| if value == libc::RLIM_INFINITY { u64::MAX } else { value };
    Limit { soft: widen(limit.rlim_cur), hard: widen(limit.rlim_max) }
}

/// The CPUs this process may run on (its affinity mask), ascending; empty when it cannot be
/// read. `server` pins shards to these.
pub fn cpus_allowed() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`.
    let result = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET only reads the set, and every index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn filesystem_of(path: &Path) -> Filesystem {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return Filesystem::Unknown };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string and `stat` is a valid statfs, both live for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Filesystem::Unknown;
    }
    match stat.f_type as i64 {
        TMPFS_MAGIC => Filesystem::Tmpfs,
        OVERLAYFS_SUPER_MAGIC => Filesystem::Overlay,
        other => Filesystem::Other(other),
    }
}

/// Checks the data directory the way the WAL will use it: by creating a file in it (or in its
/// closest existing ancestor, where the server would create it). Permission bits alone would
/// mislead: root ignores them, and a read-only mount or a seccomp policy does not show in them.
fn inspect_data_dir(path: &Path) -> DataDir {
    let (access, on) = match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => (probe_create(path).map_or_else(unusable, |()| DirAccess::Writable), path),
        Ok(_) => (DirAccess::Unusable { reason: format!("{} is not a directory", path.display()) }, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match closest_ancestor(path) {
            Some(ancestor) if ancestor.is_dir() => {
                let access = probe_create(&ancestor)
                    .map_or_else(unusable, |()| DirAccess::Creatable { ancestor: ancestor.clone() });
                return DataDir { path: path.to_path_buf(), filesystem: filesystem_of(&ancestor), access };
            }
            Some(ancestor) => {
                let reason = format!("cannot be created: {} is not a directory", ancestor.display());
                (DirAccess::Unusable { reason }, path)
            }
            None => (DirAccess::Unusable { reason: "no existing ancestor".into() }, path),
        },
        Err(e) => (DirAccess::Unusable { reason: format!("{}: {e}", path.display()) }, path),
    };
    DataDir { path: path.to_path_buf(), filesystem: filesystem_of(on), access }
}

fn unusable(reason: String) -> DirAccess {
    DirAccess::Unusable { reason }
}

/// Creates and removes one probe file in `dir`.
fn probe_create(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".ringwire-doctor-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot create a file in {}: {e}", dir.display())),
    }
}

/// The closest ancestor of `path` that exists (relative paths start from the working directory).
fn closest_ancestor(path: &Path) -> Option<PathBuf> {
    let absolute = match path.is_absolute() {
        true => path.to_path_buf(),
        false => std::env::current_dir().ok()?.join(path),
    };
    absolute.ancestors().skip(1).find(|p| p.exists()).map(Path::to_path_buf)
}

fn inspect_tls_file(key: &'static str, path: PathBuf) -> TlsFile {
    let readable = std::fs::read(&path).map(|bytes| bytes.len() as u64).map_err(|e| e.to_string());
    TlsFile { key, path, readable }
}

/// One TCP connect to the Redis address (resolving its host name first); no Redis command is
/// sent, so no password leaves the process.
fn connect_redis(url: &str, timeout_ms: u64) -> Result<SocketAddr, String> {
    let url = crate::redis_url::RedisUrl::parse(url)?;
    let address = url.resolve().map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
    TcpStream::connect_timeout(&address, Duration::from_millis(timeout_ms.max(1)))
        .map(|_| address)
        .map_err(|e| format!("cannot connect to {address}: {e}"))
}
