//! An in-memory [`Storage`] for tests that models what survives a crash.
//!
//! Each file keeps its live bytes and the bytes of its last sync; each directory keeps its live entries
//! and the entries of its last sync. A crash ([`MemStorage::restart`]) keeps only the synced images, as a
//! power loss would: files whose directory entry was never synced disappear, unsynced writes are lost
//! (or, with [`Unsynced::KeepRandomPrefix`], a random prefix of them survives, as a torn write would).
//!
//! Faults are counted in sync points (every file or directory sync): the disk can crash at the n-th one
//! (that sync fails and so does every later operation) or fail just that one with an IO error.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::io::{File, Storage};

type DirId = u64;

#[derive(Clone)]
enum Node {
    File(Arc<MemFile>),
    Dir(DirId),
}

#[derive(Default)]
struct Dir {
    live: BTreeMap<String, Node>,
    durable: BTreeMap<String, Node>,
}

#[derive(Default)]
struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// What [`File::wait_writeback`] put in the device's write cache: the durable image with the
    /// live bytes over it, within the durable length only (writeback commits no metadata). The
    /// next sync of any file makes it durable.
    written: Option<Vec<u8>>,
    /// Where the live image's written blocks end: space that [`File::allocate`] reserved past it
    /// reads as zeros but is not written, and writing there is a metadata change.
    live_written: usize,
    /// `live_written` as of the last sync: the reach of a writeback.
    durable_written: usize,
}

/// An in-memory file.
pub struct MemFile {
    data: Mutex<FileData>,
    faults: Arc<Mutex<Faults>>,
    /// This file, for the list of files written back.
    weak: std::sync::Weak<MemFile>,
}

#[derive(Default)]
struct Faults {
    syncs: u64,
    crash_at_sync: Option<u64>,
    fail_sync_at: Option<u64>,
    crashed: bool,
    /// Full file syncs (each a flush of the device's write cache) so far.
    file_syncs: u64,
    /// Files with data in the device's write cache (see `FileData::written`).
    written_back: Vec<std::sync::Weak<MemFile>>,
}

impl Faults {
    fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(io::Error::other("simulated crash: the disk is gone"))
        } else {
            Ok(())
        }
    }

    /// Counts one sync point and decides its fate.
    fn sync_point(&mut self) -> io::Result<()> {
        self.check()?;
        self.syncs += 1;
        if self.crash_at_sync == Some(self.syncs) {
            self.crashed = true;
            return Err(io::Error::other("simulated crash at a sync point"));
        }
        if self.fail_sync_at == Some(self.syncs) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        Ok(())
    }
}

/// What happens to unsynced file data in a crash.
#[derive(Debug, Clone, Copy)]
pub enum Unsynced {
    /// All of it is lost.
    Drop,
    /// A random prefix of the bytes appended since the last sync survives (seeded).
    KeepRandomPrefix(u64),
}

struct State {
    dirs: HashMap<DirId, Dir>,
    next_dir: DirId,
}

const ROOT: DirId = 0;

/// See the module documentation.
#[derive(Clone)]
pub struct MemStorage {
    state: Arc<Mutex<State>>,
    faults: Arc<Mutex<Faults>>,
}

impl Default for MemStorage {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn names(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            _ => return Err(io::Error::other("unsupported path component")),
        }
    }
    Ok(out)
}

impl State {
    fn dir(&self, id: DirId) -> &Dir {
        self.dirs
            .get(&id)
            .expect("directory ids in entries always exist")
    }

    fn dir_mut(&mut self, id: DirId) -> &mut Dir {
        self.dirs
            .get_mut(&id)
            .expect("directory ids in entries always exist")
    }

    fn resolve_dir(&self, path: &Path) -> io::Result<DirId> {
        let mut id = ROOT;
        for name in names(path)? {
            match self.dir(id).live.get(&name) {
                Some(Node::Dir(d)) => id = *d,
                _ => return Err(not_found(path)),
            }
        }
        Ok(id)
    }

    /// The parent directory and the last name of a path.
    fn split(&self, path: &Path) -> io::Result<(DirId, String)> {
        let mut n = names(path)?;
        let last = n
            .pop()
            .ok_or_else(|| io::Error::other("path has no name"))?;
        let parent: std::path::PathBuf = n.iter().collect();
        Ok((self.resolve_dir(&Path::new("/").join(parent))?, last))
    }
}

impl MemStorage {
    pub fn new() -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(ROOT, Dir::default());
        MemStorage {
            state: Arc::new(Mutex::new(State { dirs, next_dir: 1 })),
            faults: Arc::new(Mutex::new(Faults::default())),
        }
    }

    /// Sync points (file and directory syncs) counted so far.
    pub fn syncs(&self) -> u64 {
        lock(&self.faults).syncs
    }

    /// Full file syncs so far (each flushes the write cache; writebacks and directory syncs are
    /// not counted).
    pub fn file_syncs(&self) -> u64 {
        lock(&self.faults).file_syncs
    }

    /// Crashes the disk at the n-th sync point from now on (1-based): it fails, and so does every
    /// operation after it.
    pub fn crash_at_sync(&self, n: u64) {
        let mut f = lock(&self.faults);
        f.crash_at_sync = Some(f.syncs + n);
    }

    /// Fails the n-th sync point from now on (1-based) with an IO error; the disk keeps working.
    pub fn fail_sync_at(&self, n: u64) {
        let mut f = lock(&self.faults);
        f.fail_sync_at = Some(f.syncs + n);
    }

    /// Whether the disk has crashed.
    pub fn crashed(&self) -> bool {
        lock(&self.faults).crashed
    }

    /// A new disk holding what survives a crash of this one now.
    pub fn restart(&self, unsynced: Unsynced) -> MemStorage {
        let state = lock(&self.state);
        let mut rng = match unsynced {
            Unsynced::Drop => None,
            Unsynced::KeepRandomPrefix(seed) => Some(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        };
        let faults = Arc::new(Mutex::new(Faults::default()));
        let mut dirs = HashMap::new();
        let mut copied: HashMap<*const MemFile, Arc<MemFile>> = HashMap::new();
        for (id, dir) in &state.dirs {
            let mut entries = BTreeMap::new();
            for (name, node) in &dir.durable {
                let node = match node {
                    Node::Dir(d) => Node::Dir(*d),
                    Node::File(f) => {
                        let key = Arc::as_ptr(f);
                        let copy = copied.entry(key).or_insert_with(|| {
                            let data = lock(&f.data);
                            let mut bytes = data.durable.clone();
                            if let Some(x) = rng.as_mut()
                                && data.live.len() > bytes.len()
                                && data.live.starts_with(&bytes)
                            {
                                *x ^= *x << 13;
                                *x ^= *x >> 7;
                                *x ^= *x << 17;
                                let extra = data.live.len() - bytes.len();
                                let keep = (*x % (extra as u64 + 1)) as usize;
                                bytes
                                    .extend_from_slice(&data.live[bytes.len()..bytes.len() + keep]);
                            }
                            Arc::new_cyclic(|weak| MemFile {
                                data: Mutex::new(FileData {
                                    live: bytes.clone(),
                                    live_written: bytes.len(),
                                    durable_written: bytes.len(),
                                    durable: bytes,
                                    written: None,
                                }),
                                faults: faults.clone(),
                                weak: weak.clone(),
                            })
                        });
                        Node::File(copy.clone())
                    }
                };
                entries.insert(name.clone(), node);
            }
            dirs.insert(
                *id,
                Dir {
                    live: entries.clone(),
                    durable: entries,
                },
            );
        }
        MemStorage {
            state: Arc::new(Mutex::new(State {
                dirs,
                next_dir: state.next_dir,
            })),
            faults,
        }
    }

    /// Direct access to a file's live bytes, for tests that damage files.
    pub fn edit_file(&self, path: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let state = lock(&self.state);
        let (dir, name) = state.split(path)?;
        match state.dir(dir).live.get(&name) {
            Some(Node::File(f)) => {
                let mut data = lock(&f.data);
                edit(&mut data.live);
                data.durable = data.live.clone();
                data.live_written = data.live.len();
                data.durable_written = data.live.len();
                data.written = None;
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    /// The live length of a file, for tests.
    pub fn open_file_len(&self, path: &Path) -> io::Result<u64> {
        self.open_file(path, false)?.len()
    }

    /// Removes a file and makes that durable at once, for tests that damage a log.
    pub fn remove_file_for_test(&self, path: &Path) {
        let mut state = lock(&self.state);
        if let Ok((dir, name)) = state.split(path) {
            let dir = state.dir_mut(dir);
            dir.live.remove(&name);
            dir.durable.remove(&name);
        }
    }

    fn check(&self) -> io::Result<()> {
        lock(&self.faults).check()
    }
}

impl Storage for MemStorage {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut state = lock(&self.state);
        let (parent, name) = state.split(path)?;
        if state.dir(parent).live.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let id = state.next_dir;
        state.next_dir += 1;
        state.dirs.insert(id, Dir::default());
        state.dir_mut(parent).live.insert(name, Node::Dir(id));
        Ok(())
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        self.check()?;
        let mut state = lock(&self.state);
        let (parent, name) = state.split(path)?;
        match state.dir(parent).live.get(&name) {
            Some(Node::File(f)) => Ok(f.clone()),
            Some(Node::Dir(_)) => Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            ))),
            None if create => {
                let f = Arc::new_cyclic(|weak| MemFile {
                    data: Mutex::new(FileData::default()),
                    faults: self.faults.clone(),
                    weak: weak.clone(),
                });
                state
                    .dir_mut(parent)
                    .live
                    .insert(name, Node::File(f.clone()));
                Ok(f)
            }
            None => Err(not_found(path)),
        }
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.check()?;
        let state = lock(&self.state);
        let id = state.resolve_dir(path)?;
        Ok(state.dir(id).live.keys().cloned().collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.check()?;
        let state = lock(&self.state);
        if path.parent().is_none() {
            return Ok(true);
        }
        let Ok((parent, name)) = state.split(path) else {
            return Ok(false);
        };
        Ok(state.dir(parent).live.contains_key(&name))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut state = lock(&self.state);
        let (parent, name) = state.split(path)?;
        match state.dir(parent).live.get(&name) {
            Some(Node::File(_)) => {
                state.dir_mut(parent).live.remove(&name);
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        let mut state = lock(&self.state);
        let (parent, name) = state.split(path)?;
        match state.dir(parent).live.get(&name) {
            Some(Node::Dir(_)) => {
                state.dir_mut(parent).live.remove(&name);
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check()?;
        let mut state = lock(&self.state);
        let (from_dir, from_name) = state.split(from)?;
        let (to_dir, to_name) = state.split(to)?;
        let node = state
            .dir_mut(from_dir)
            .live
            .remove(&from_name)
            .ok_or_else(|| not_found(from))?;
        state.dir_mut(to_dir).live.insert(to_name, node);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        lock(&self.faults).sync_point()?;
        let mut state = lock(&self.state);
        let id = state.resolve_dir(path)?;
        let dir = state.dir_mut(id);
        dir.durable = dir.live.clone();
        Ok(())
    }
}

impl File for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        lock(&self.faults).check()?;
        let data = lock(&self.data);
        let start = usize::try_from(position).map_err(io::Error::other)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("read past end"))?;
        if end > data.live.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        buf.copy_from_slice(&data.live[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        lock(&self.faults).check()?;
        let mut data = lock(&self.data);
        let start = usize::try_from(position).map_err(io::Error::other)?;
        let end = start + buf.len();
        if data.live.len() < end {
            data.live.resize(end, 0);
        }
        data.live[start..end].copy_from_slice(buf);
        data.live_written = data.live_written.max(end);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        lock(&self.faults).check()?;
        Ok(lock(&self.data).live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        lock(&self.faults).check()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut data = lock(&self.data);
        data.live.resize(len, 0);
        data.live_written = data.live_written.min(len);
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        lock(&self.faults).check()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut data = lock(&self.data);
        if data.live.len() < len {
            data.live.resize(len, 0);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let written_back = {
            let mut faults = lock(&self.faults);
            faults.sync_point()?;
            faults.file_syncs += 1;
            std::mem::take(&mut faults.written_back)
        };
        // The device's write cache is flushed: what other files wrote back is durable too.
        for f in written_back.iter().filter_map(|f| f.upgrade()) {
            let mut data = lock(&f.data);
            if let Some(w) = data.written.take() {
                data.durable = w;
            }
        }
        let mut data = lock(&self.data);
        data.durable = data.live.clone();
        data.durable_written = data.live_written;
        data.written = None;
        Ok(())
    }

    fn wait_writeback(&self) -> io::Result<()> {
        let mut faults = lock(&self.faults);
        faults.sync_point()?;
        let mut data = lock(&self.data);
        let mut image = data.written.take().unwrap_or_else(|| data.durable.clone());
        let n = image.len().min(data.live.len()).min(data.durable_written);
        image[..n].copy_from_slice(&data.live[..n]);
        data.written = Some(image);
        drop(data);
        faults.written_back.push(self.weak.clone());
        Ok(())
    }

    fn cache_domain(&self) -> Option<u64> {
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_file_and_entry_are_lost_in_a_crash() {
        let disk = MemStorage::new();
        disk.create_dir(Path::new("/d")).unwrap();
        disk.sync_dir(Path::new("/")).unwrap();
        let f = disk.open_file(Path::new("/d/a"), true).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync().unwrap();
        // The entry of /d/a was never synced.
        let after = disk.restart(Unsynced::Drop);
        assert!(!after.exists(Path::new("/d/a")).unwrap());

        disk.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b" world", 5).unwrap();
        let after = disk.restart(Unsynced::Drop);
        let g = after.open_file(Path::new("/d/a"), false).unwrap();
        assert_eq!(g.len().unwrap(), 5);
    }

    #[test]
    fn crash_at_sync_fails_everything_after() {
        let disk = MemStorage::new();
        disk.crash_at_sync(2);
        disk.sync_dir(Path::new("/")).unwrap();
        assert!(disk.sync_dir(Path::new("/")).is_err());
        assert!(disk.crashed());
        assert!(disk.create_dir(Path::new("/x")).is_err());
    }

    #[test]
    fn renamed_directory_keeps_its_children() {
        let disk = MemStorage::new();
        disk.create_dir(Path::new("/a")).unwrap();
        let f = disk.open_file(Path::new("/a/f"), true).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.sync().unwrap();
        disk.sync_dir(Path::new("/a")).unwrap();
        disk.create_dir(Path::new("/b")).unwrap();
        disk.rename(Path::new("/a"), Path::new("/b/c")).unwrap();
        disk.sync_dir(Path::new("/b")).unwrap();
        disk.sync_dir(Path::new("/")).unwrap();
        let after = disk.restart(Unsynced::Drop);
        assert!(after.exists(Path::new("/b/c/f")).unwrap());
        assert!(!after.exists(Path::new("/a")).unwrap());
    }
}
