//! The narrow file-IO seam of the log.
//!
//! Every byte the log reads or writes goes through [`Storage`] and [`File`]. The real implementation,
//! [`FsStorage`], maps them onto `std::fs` with positional reads and writes; [`crate::mem::MemStorage`]
//! keeps files in memory, remembers what has been synced, and can crash or fail at any sync point so
//! tests can check what survives.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory tree that holds the log's files.
pub trait Storage: Send + Sync + 'static {
    /// Creates one directory; its parent must exist. Durable once the parent is synced.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Opens a file for reading and writing, creating it (empty) when `create` is set and it is absent.
    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>>;
    /// Names of the entries of a directory, sorted.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether a file or directory exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from` (a file or a directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the entries of a directory (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// An open file with positional IO.
#[allow(clippy::len_without_is_empty)]
pub trait File: Send + Sync {
    /// Fills `buf` from `position`; fails with `UnexpectedEof` when the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()>;
    /// Appends `len` bytes read from `position` to `buf`; fails with `UnexpectedEof` when the file
    /// is shorter (`buf` then holds what it held before).
    fn read_exact_appending(&self, buf: &mut Vec<u8>, len: usize, position: u64) -> io::Result<()> {
        let start = buf.len();
        buf.resize(start + len, 0);
        let r = self.read_exact_at(&mut buf[start..], position);
        if r.is_err() {
            buf.truncate(start);
        }
        r
    }
    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends the file to `len` bytes reading as zeros, with the disk space reserved where the
    /// file system can (so later writes there need not allocate).
    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.len()? < len {
            self.set_len(len)?;
        }
        Ok(())
    }
    /// Writes zeros from `from` to `to`, extending the file when it is shorter. Unlike
    /// [`File::allocate`], the blocks hold written data once synced, so later writes there are
    /// plain overwrites that an fsync flushes without a metadata commit.
    fn write_zeros(&self, from: u64, to: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
    /// Makes the file's data (and the size needed to read it) durable. On a real disk this ends
    /// with a flush of the device's write cache, which also makes durable what
    /// [`File::wait_writeback`] wrote of other files in the same [`File::cache_domain`].
    fn sync(&self) -> io::Result<()>;
    /// Starts writing the file's changed data to the device, without waiting and without its
    /// metadata (see [`File::wait_writeback`]).
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Writes the file's changed data to the device and waits until the device has it, without
    /// its metadata and without flushing the device's write cache: the data is durable once a
    /// later [`File::sync`] of a file in the same [`File::cache_domain`] completes, and only
    /// where it overwrote blocks whose allocation (and the file's length over them) was durable
    /// before. Where no such weaker step exists, this is a full [`File::sync`].
    fn wait_writeback(&self) -> io::Result<()> {
        self.sync()
    }
    /// Files with the same domain sit behind one volatile write cache, which the [`File::sync`]
    /// of any of them flushes; `None` when that is not known.
    fn cache_domain(&self) -> Option<u64> {
        None
    }
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

struct FsFile {
    file: std::fs::File,
    /// The device the file lives on, where its file system overwrites in place (see
    /// [`File::cache_domain`]).
    device: Option<u64>,
}

impl Storage for FsStorage {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        let device = overwrites_in_place(&file)
            .then(|| {
                use std::os::unix::fs::MetadataExt;
                file.metadata().ok().map(|m| m.dev())
            })
            .flatten();
        Ok(Arc::new(FsFile { file, device }))
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
}

impl File for FsFile {
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, position)
    }

    /// Reads into the vector's spare capacity: large reads do not first fill their buffer with
    /// zeros.
    #[allow(unsafe_code)]
    fn read_exact_appending(&self, buf: &mut Vec<u8>, len: usize, position: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        buf.reserve(len);
        let start = buf.len();
        let mut done = 0;
        while done < len {
            let spare = &mut buf.spare_capacity_mut()[done..len];
            let at = libc::off_t::try_from(position + done as u64).map_err(io::Error::other)?;
            // SAFETY: the kernel writes at most `spare.len()` bytes into memory the vector owns
            // and has reserved; none of it is read before the bytes are counted as written.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast::<libc::c_void>(),
                    spare.len(),
                    at,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ));
            }
            done += n as usize;
        }
        // SAFETY: `pread` initialized the `len` bytes after `start`, within the reserved capacity.
        unsafe { buf.set_len(start + len) };
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        self.file.write_all_at(buf, position)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn allocate(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = i64::try_from(len).map_err(io::Error::other)?;
        // SAFETY: fallocate reads no memory; the descriptor is open for the life of `self`.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A file system without fallocate: a plain extension.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                if self.file.metadata()?.len() < len as u64 {
                    self.file.set_len(len as u64)?;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&self) -> io::Result<()> {
        self.sync_range(libc::SYNC_FILE_RANGE_WRITE)
    }

    #[cfg(target_os = "linux")]
    fn wait_writeback(&self) -> io::Result<()> {
        self.sync_range(
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    }

    #[cfg(target_os = "linux")]
    fn cache_domain(&self) -> Option<u64> {
        self.device
    }
}

/// Whether the file system writes data over written blocks in place, so that writing back an
/// overwrite changes no metadata and a later flush of the device's cache makes it durable: ext2,
/// ext3, ext4 and XFS (whose log files are never reflinked). Copy-on-write file systems (Btrfs,
/// ZFS, bcachefs) write every overwrite elsewhere and must commit metadata for it, and others are
/// not known: their files never share a flush ([`File::cache_domain`] is `None`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn overwrites_in_place(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    const EXT_SUPER_MAGIC: u64 = 0xEF53;
    const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a `statfs` into the memory given; it is read only on success.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialized by the successful call above.
    let kind = unsafe { st.assume_init() }.f_type as u64;
    matches!(kind, EXT_SUPER_MAGIC | XFS_SUPER_MAGIC)
}

#[cfg(not(target_os = "linux"))]
fn overwrites_in_place(_: &std::fs::File) -> bool {
    false
}

impl FsFile {
    /// `sync_file_range` over the whole file.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn sync_range(&self, flags: libc::c_uint) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: reads no memory; the descriptor is open for the life of `self`. Offset 0
            // with length 0 means the whole file.
            let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, flags) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Writes a small metadata file so that after a crash it holds either the old or the new content:
/// temp file, fsync, rename over the target, fsync of the directory.
pub fn write_atomically(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = storage.open_file(&tmp, true)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync()?;
    drop(file);
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

/// Reads a whole (small) file.
pub fn read_all(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open_file(path, false)?;
    let len = file.len()?;
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The parent directory of a path inside the data directory.
pub fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// The nice value the threads that wait on fsyncs ask for (lower runs first).
const SYNC_THREAD_NICE: i32 = -10;

/// Runs `f` with the calling thread's scheduling priority raised, where the process may raise it
/// (root, `CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows it, e.g. systemd's `LimitNICE=`);
/// otherwise as it is. For the threads that run fsyncs: an acknowledgement waits for the fsync and
/// then for its thread to get a CPU back, which on a busy machine can take longer than the disk.
#[allow(unsafe_code)]
pub fn with_raised_priority<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(target_os = "linux")]
    {
        struct Restore(libc::id_t, i32);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: changes this thread's nice value only; lowering a priority is always
                // allowed.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, self.0, self.1) };
            }
        }
        // SAFETY: gettid has no preconditions; getpriority and setpriority read and change the
        // nice value of this thread only (Linux keeps one per thread).
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let before = unsafe {
            *libc::__errno_location() = 0;
            let p = libc::getpriority(libc::PRIO_PROCESS, tid);
            (*libc::__errno_location() == 0).then_some(p)
        };
        let _restore = before
            .filter(|&p| p > SYNC_THREAD_NICE)
            .filter(
                |_| unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, SYNC_THREAD_NICE) } == 0,
            )
            .map(|p| Restore(tid, p));
        f()
    }
    #[cfg(not(target_os = "linux"))]
    f()
}

#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
mod tests {
    fn nice() -> i32 {
        // SAFETY: reads this thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn files_share_flushes_only_on_file_systems_that_overwrite_in_place() {
        use super::{FsStorage, Storage};
        // tmpfs is not among them (nor is any copy-on-write file system).
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on Linux");
        let f = FsStorage.open_file(&dir.path().join("a"), true).unwrap();
        assert_eq!(f.cache_domain(), None);
        // ext4 and XFS are; files on the same device share their domain.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let (a, b) = (
            FsStorage.open_file(&a, true).unwrap(),
            FsStorage.open_file(&b, true).unwrap(),
        );
        let kind = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(dir.path())
            .output()
            .unwrap();
        let kind = String::from_utf8_lossy(&kind.stdout).trim().to_string();
        if kind.starts_with("ext") || kind == "xfs" {
            assert!(a.cache_domain().is_some(), "{kind}");
            assert_eq!(a.cache_domain(), b.cache_domain());
        } else {
            assert_eq!(a.cache_domain(), None, "{kind}");
        }
    }

    #[test]
    fn the_priority_is_raised_where_allowed_and_given_back_after() {
        std::thread::spawn(|| {
            let before = nice();
            let inside = super::with_raised_priority(nice);
            // SAFETY: reads the effective user id.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(inside, super::SYNC_THREAD_NICE.min(before));
            } else {
                assert!(inside <= before, "{inside} > {before}");
            }
            assert_eq!(nice(), before);
            // Given back after a panic too.
            let _ = std::panic::catch_unwind(|| super::with_raised_priority(|| panic!("inside")));
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
