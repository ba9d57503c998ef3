//! Where WAL segments live: the `Storage` trait, the real directory (`FileStorage`) and a
//! simulated disk for tests (`SimStorage`) that keeps written and durable bytes apart and can
//! crash at any sync.
//!
//! Segments are named by number (their first sequence number). The WAL only appends, truncates
//! a torn tail at recovery, and removes whole segments.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A directory of numbered segment files.
#[allow(async_fn_in_trait)] // Shard-local: the futures never cross threads.
pub trait Storage {
    /// The segments present, in increasing order.
    async fn list(&self) -> io::Result<Vec<u64>>;
    /// A segment's whole content.
    async fn read(&self, segment: u64) -> io::Result<Vec<u8>>;
    /// Creates an empty segment (its existence is durable only after `sync_dir`).
    async fn create(&self, segment: u64) -> io::Result<()>;
    /// Writes `bytes` at `offset` (durable only after `sync`).
    async fn write_at(&self, segment: u64, offset: u64, bytes: Vec<u8>) -> io::Result<()>;
    /// Cuts a segment to `length` bytes (durable only after `sync`).
    async fn truncate(&self, segment: u64, length: u64) -> io::Result<()>;
    /// Makes a segment's content durable (`fdatasync`).
    async fn sync(&self, segment: u64) -> io::Result<()>;
    /// Makes creations and removals durable (`fsync` of the directory).
    async fn sync_dir(&self) -> io::Result<()>;
    /// Removes a segment (durable only after `sync_dir`).
    async fn remove(&self, segment: u64) -> io::Result<()>;
}

/// Segments as files `{segment:020}.wal` in one directory.
///
/// Appends and syncs of segment files go through monoio (io_uring: they do not block the
/// shard). Every other call (listing, reading, creating, opening, truncating, removing, and
/// directory fsyncs) has no io_uring op in monoio 0.2.4 and is a blocking syscall, so it runs
/// on the runtime's blocking thread pool (`spawn_blocking`), never on the shard thread. Under
/// the epoll fallback monoio's file writes and syncs block the shard too (docs/webhooks.md).
pub struct FileStorage {
    directory: PathBuf,
    files: RefCell<HashMap<u64, Rc<monoio::fs::File>>>,
}

/// Runs a blocking file-system call on the runtime's thread pool.
async fn off_thread<R: Send + 'static>(call: impl FnOnce() -> io::Result<R> + Send + 'static) -> io::Result<R> {
    monoio::spawn_blocking(call).await.map_err(|_| io::Error::other("the blocking file task was canceled"))?
}

/// Creates `directory` and its missing parents so that the creation survives a power loss: a
/// directory entry is durable only once its parent directory is fsynced, so the parent of
/// every created component is fsynced, and the directory's own parent always (an earlier run
/// may have died between creating it and syncing). `sync_dir` is the fsync (tests record it).
pub fn create_dir_durably(directory: &Path, sync_dir: &mut dyn FnMut(&Path) -> io::Result<()>) -> io::Result<()> {
    let parent_of = |path: &Path| match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut to_sync: Vec<PathBuf> = directory.ancestors().take_while(|p| !p.exists()).map(parent_of).collect();
    std::fs::create_dir_all(directory)?;
    to_sync.push(parent_of(directory));
    to_sync.sort();
    to_sync.dedup();
    for parent in to_sync {
        sync_dir(&parent)?;
    }
    Ok(())
}

fn fsync_dir(directory: &Path) -> io::Result<()> {
    std::fs::File::open(directory)?.sync_all()
}

impl FileStorage {
    /// Opens (creating it durably if needed) a segment directory.
    pub async fn open(directory: &Path) -> io::Result<FileStorage> {
        let path = directory.to_path_buf();
        off_thread(move || create_dir_durably(&path, &mut fsync_dir)).await?;
        Ok(FileStorage { directory: directory.to_path_buf(), files: RefCell::new(HashMap::new()) })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.directory.join(format!("{segment:020}.wal"))
    }

    async fn file(&self, segment: u64) -> io::Result<Rc<monoio::fs::File>> {
        if let Some(file) = self.files.borrow().get(&segment) {
            return Ok(file.clone());
        }
        let path = self.path(segment);
        let std_file = off_thread(move || std::fs::OpenOptions::new().read(true).write(true).open(path)).await?;
        let file = Rc::new(monoio::fs::File::from_std(std_file)?);
        self.files.borrow_mut().insert(segment, file.clone());
        Ok(file)
    }
}

impl Storage for FileStorage {
    async fn list(&self) -> io::Result<Vec<u64>> {
        let directory = self.directory.clone();
        off_thread(move || {
            let mut segments = Vec::new();
            for entry in std::fs::read_dir(&directory)? {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                if let Some(number) = name.strip_suffix(".wal").and_then(|n| n.parse::<u64>().ok()) {
                    segments.push(number);
                }
            }
            segments.sort_unstable();
            Ok(segments)
        })
        .await
    }

    async fn read(&self, segment: u64) -> io::Result<Vec<u8>> {
        let path = self.path(segment);
        off_thread(move || std::fs::read(path)).await
    }

    async fn create(&self, segment: u64) -> io::Result<()> {
        let path = self.path(segment);
        off_thread(move || std::fs::OpenOptions::new().write(true).create_new(true).open(path).map(drop)).await
    }

    async fn write_at(&self, segment: u64, offset: u64, bytes: Vec<u8>) -> io::Result<()> {
        let file = self.file(segment).await?;
        let (result, _) = file.write_all_at(bytes, offset).await;
        result
    }

    async fn truncate(&self, segment: u64, length: u64) -> io::Result<()> {
        let path = self.path(segment);
        off_thread(move || std::fs::OpenOptions::new().write(true).open(path)?.set_len(length)).await
    }

    async fn sync(&self, segment: u64) -> io::Result<()> {
        self.file(segment).await?.sync_data().await
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let directory = self.directory.clone();
        off_thread(move || fsync_dir(&directory)).await
    }

    async fn remove(&self, segment: u64) -> io::Result<()> {
        self.files.borrow_mut().remove(&segment);
        let path = self.path(segment);
        off_thread(move || std::fs::remove_file(path)).await
    }
}

/// One simulated file.
#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What reads see now (the page cache).
    written: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Whether the file's creation survives a crash.
    entry_durable: bool,
    /// The file's length after each `sync` that made it longer (for tests' oracles).
    synced_lengths: Vec<usize>,
}

#[derive(Debug, Default)]
struct SimDisk {
    files: BTreeMap<u64, SimFile>,
    /// Removed files whose removal is not durable yet.
    removed: BTreeMap<u64, SimFile>,
    /// Sync calls so far (`sync` and `sync_dir`).
    syncs: u64,
    /// The sync call (1-based) that fails and crashes the disk.
    crash_at_sync: Option<u64>,
    crashed: bool,
}

/// A simulated disk for tests: written and durable bytes kept apart; can crash at a chosen
/// sync, after which every call fails; `crash_image` gives what a restart would find.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    disk: Rc<RefCell<SimDisk>>,
}

impl SimStorage {
    /// An empty disk.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Makes the `n`-th sync call from now (1-based) fail and crash the disk.
    pub fn crash_at_sync(&self, n: u64) {
        let mut disk = self.disk.borrow_mut();
        disk.crash_at_sync = Some(disk.syncs + n);
    }

    /// Crashes the disk now.
    pub fn crash(&self) {
        self.disk.borrow_mut().crashed = true;
    }

    /// Whether the disk has crashed.
    pub fn crashed(&self) -> bool {
        self.disk.borrow().crashed
    }

    /// Sync calls so far.
    pub fn syncs(&self) -> u64 {
        self.disk.borrow().syncs
    }

    /// The length a segment had at the sync before its last growing one: the bytes the WAL's
    /// newest durable batch mark proves fsynced (0 when unknown). Works after a crash too.
    pub fn proven_bytes(&self, segment: u64) -> usize {
        let disk = self.disk.borrow();
        let file = disk.files.get(&segment).or_else(|| disk.removed.get(&segment));
        file.and_then(|f| f.synced_lengths.iter().rev().nth(1).copied()).unwrap_or(0)
    }

    /// Flips one bit of a segment's bytes, written and durable alike (bit rot).
    pub fn flip_bit(&self, segment: u64, offset: usize, bit: u8) {
        let mut disk = self.disk.borrow_mut();
        let file = disk.files.get_mut(&segment).expect("flip_bit on an existing segment");
        file.written[offset] ^= 1 << bit;
        if let Some(byte) = file.durable.get_mut(offset) {
            *byte ^= 1 << bit;
        }
    }

    /// Bytes of a segment as reads see them (after a crash too).
    pub fn len_of(&self, segment: u64) -> usize {
        self.disk.borrow().files.get(&segment).map_or(0, |f| f.written.len())
    }

    /// What a restart after a crash now would find: durable entries with their durable bytes,
    /// plus a prefix of their unsynced appends (`tear` picks its length in 0..=len) whose last
    /// bytes may be garbage (`garbage`).
    pub fn crash_image(&self, tear: &mut dyn FnMut(usize) -> usize, garbage: &mut dyn FnMut() -> bool) -> SimStorage {
        let disk = self.disk.borrow();
        let mut files = BTreeMap::new();
        let all = disk.files.iter().chain(disk.removed.iter());
        for (&segment, file) in all.filter(|(_, f)| f.entry_durable) {
            let mut content = file.durable.clone();
            if file.written.len() > content.len() && file.written.starts_with(&content) {
                let extra = &file.written[content.len()..];
                let kept = tear(extra.len()).min(extra.len());
                content.extend_from_slice(&extra[..kept]);
                if kept > 0 && garbage() {
                    let from = content.len() - kept.min(1 + (kept % 16));
                    for byte in &mut content[from..] {
                        *byte = byte.wrapping_mul(31).wrapping_add(7);
                    }
                }
            }
            let synced_lengths = file.synced_lengths.clone();
            files.insert(
                segment,
                SimFile { written: content.clone(), durable: content, entry_durable: true, synced_lengths },
            );
        }
        SimStorage { disk: Rc::new(RefCell::new(SimDisk { files, ..SimDisk::default() })) }
    }

    fn live(&self) -> io::Result<std::cell::RefMut<'_, SimDisk>> {
        let disk = self.disk.borrow_mut();
        if disk.crashed {
            return Err(io::Error::other("simulated disk crashed"));
        }
        Ok(disk)
    }

    fn sync_point(&self) -> io::Result<std::cell::RefMut<'_, SimDisk>> {
        let mut disk = self.live()?;
        disk.syncs += 1;
        if disk.crash_at_sync == Some(disk.syncs) {
            disk.crashed = true;
            return Err(io::Error::other("simulated crash at a sync"));
        }
        Ok(disk)
    }
}

fn missing(segment: u64) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no segment {segment}"))
}

impl Storage for SimStorage {
    async fn list(&self) -> io::Result<Vec<u64>> {
        Ok(self.live()?.files.keys().copied().collect())
    }

    async fn read(&self, segment: u64) -> io::Result<Vec<u8>> {
        self.live()?.files.get(&segment).map(|f| f.written.clone()).ok_or_else(|| missing(segment))
    }

    async fn create(&self, segment: u64) -> io::Result<()> {
        let mut disk = self.live()?;
        if disk.files.contains_key(&segment) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "segment exists"));
        }
        disk.removed.remove(&segment);
        disk.files.insert(segment, SimFile::default());
        Ok(())
    }

    async fn write_at(&self, segment: u64, offset: u64, bytes: Vec<u8>) -> io::Result<()> {
        let mut disk = self.live()?;
        let file = disk.files.get_mut(&segment).ok_or_else(|| missing(segment))?;
        let offset = offset as usize;
        if file.written.len() < offset + bytes.len() {
            file.written.resize(offset + bytes.len(), 0);
        }
        file.written[offset..offset + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }

    async fn truncate(&self, segment: u64, length: u64) -> io::Result<()> {
        let mut disk = self.live()?;
        let file = disk.files.get_mut(&segment).ok_or_else(|| missing(segment))?;
        file.written.truncate(length as usize);
        Ok(())
    }

    async fn sync(&self, segment: u64) -> io::Result<()> {
        let mut disk = self.sync_point()?;
        let file = disk.files.get_mut(&segment).ok_or_else(|| missing(segment))?;
        file.durable = file.written.clone();
        if file.synced_lengths.last() < Some(&file.durable.len()) {
            file.synced_lengths.push(file.durable.len());
        }
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let mut disk = self.sync_point()?;
        disk.removed.clear();
        for file in disk.files.values_mut() {
            file.entry_durable = true;
        }
        Ok(())
    }

    async fn remove(&self, segment: u64) -> io::Result<()> {
        let mut disk = self.live()?;
        let file = disk.files.remove(&segment).ok_or_else(|| missing(segment))?;
        if file.entry_durable {
            disk.removed.insert(segment, file);
        }
        Ok(())
    }
}
