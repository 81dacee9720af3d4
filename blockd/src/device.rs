//! The data path of a volume: positioned reads and writes on something with a fixed
//! size. Every frontend (the NBD server, the vhost-user-blk backend) serves a
//! `BlockDevice`, and every backend (a file, an LVM logical volume, memory, an NBD
//! export on another host) provides one, so frontends and backends combine freely.
//!
//! The trait is synchronous on purpose: positioned I/O on a file or block device is a
//! system call that does not benefit from an async wrapper, and the vhost-user worker
//! threads are plain threads. Async callers run it on their blocking pool.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// A fixed-size array of bytes that can be read, written, flushed and discarded.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True when writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Fills `buf` from `offset`. Reads past the end are an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads as [`BlockDevice::read_at`] does when that needs no waiting for a disk
    /// (the data is in memory). `None`: it would wait, and the caller reads with
    /// `read_at` (having made sure it does not hold up other work meanwhile). Devices
    /// that cannot tell just read.
    fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, offset))
    }
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the device the range is unused; later reads may return anything but
    /// hearth's devices return zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read back as zeroes, deallocating it where `may_trim` allows.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()>;
    /// The writable file behind the device, for writes that go from a socket to the
    /// file with `splice(2)` rather than through a buffer. `None`: writes come through
    /// [`BlockDevice::write_at`] only.
    fn splice_target(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Checks that `offset..offset+len` lies inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is outside the device ({size} bytes)"),
        )),
    }
}

/// A regular file or a block device node, read and written with `pread`/`pwrite`.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
    /// Block device nodes cannot punch holes; they get BLKZEROOUT/BLKDISCARD instead.
    is_block_device: bool,
    /// Whether reads with `RWF_NOWAIT` work here (tmpfs refuses them; it never waits
    /// for a disk anyway).
    nowait_reads: AtomicBool,
}

impl FileDevice {
    /// Opens `path` for reading, and for writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileDevice> {
        use std::os::unix::fs::FileTypeExt;
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            // A block device's metadata says 0: its size is where it ends.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(FileDevice {
            file,
            size,
            read_only,
            is_block_device,
            nowait_reads: AtomicBool::new(true),
        })
    }

    fn refuse_if_read_only(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the device is read-only",
            ));
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a file descriptor this struct owns, with plain integers.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn blk_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 from the pointer, which points to
        // a live array of two u64.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_buffer(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; 1 << 20];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }
    fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = check_range(self.size, offset, buf.len() as u64) {
            return Some(Err(e));
        }
        let mut done = 0;
        while done < buf.len() && self.nowait_reads.load(Ordering::Relaxed) {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let at = (offset + done as u64) as libc::off_t;
            // SAFETY: one iovec over a live, writable buffer of its own length, on a
            // file descriptor this struct owns.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            match n {
                // Shorter than the size it had when opened: as `read_exact_at` says.
                0 => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
                n if n > 0 => done += n as usize,
                _ => match io::Error::last_os_error() {
                    // The rest is not in memory (a short read before this said so).
                    e if e.kind() == io::ErrorKind::WouldBlock => return None,
                    e if e.kind() == io::ErrorKind::Interrupted => {}
                    e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        self.nowait_reads.store(false, Ordering::Relaxed);
                    }
                    e => return Some(Err(e)),
                },
            }
        }
        Some(self.file.read_exact_at(&mut buf[done..], offset + done as u64))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.refuse_if_read_only()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }
    fn splice_target(&self) -> Option<BorrowedFd<'_>> {
        (!self.read_only).then(|| self.file.as_fd())
    }
    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_if_read_only()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            return self.blk_ioctl(BLKDISCARD, offset, len);
        }
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.refuse_if_read_only()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            return self.blk_ioctl(BLKZEROOUT, offset, len);
        }
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without the fallocate mode still get zeroes, written out.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zero_buffer(offset, len),
            Err(e) => Err(e),
        }
    }
}

/// A device held in memory, for tests and scratch volumes.
#[derive(Debug)]
pub struct MemoryDevice {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryDevice {
    pub fn new(size: u64) -> MemoryDevice {
        MemoryDevice {
            bytes: RwLock::new(vec![0; size as usize]),
        }
    }
    /// A device holding a copy of `bytes` (snapshots and clones of in-memory volumes).
    pub fn from_bytes(bytes: Vec<u8>) -> MemoryDevice {
        MemoryDevice {
            bytes: RwLock::new(bytes),
        }
    }
    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Grows the device, filling with zeroes.
    pub fn grow(&self, size: u64) {
        let mut b = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        if size as usize > b.len() {
            b.resize(size as usize, 0);
        }
    }
    fn fill_zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(b.len() as u64, offset, len)?;
        b[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        check_range(b.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(b.len() as u64, offset, buf.len() as u64)?;
        b[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill_zero(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.fill_zero(offset, len)
    }
}

/// A shared device is a device: lets `ReadOnly` wrap an `Arc`.
impl<D: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        (**self).read_at_if_cached(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, len, may_trim)
    }
    fn splice_target(&self) -> Option<BorrowedFd<'_>> {
        (**self).splice_target()
    }
}

/// A read-only view of another device (read-only exports).
#[derive(Debug)]
pub struct ReadOnly<D>(pub D);

impl<D: BlockDevice> BlockDevice for ReadOnly<D> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.0.read_at_if_cached(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(read_only_error())
    }
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the device is read-only")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(dev: &dyn BlockDevice) {
        let size = dev.size();
        dev.write_at(&[7u8; 8192], 4096).expect("write");
        let mut buf = vec![0u8; 8192];
        dev.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 7));
        dev.write_zeroes(4096, 4096, false).expect("zero");
        dev.discard(8192, 4096).expect("discard");
        dev.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "zeroed and discarded ranges read as zero");
        assert!(
            dev.read_at(&mut buf, size - 4096).is_err(),
            "read past the end is refused"
        );
        assert!(dev.write_at(&buf, size).is_err(), "write past the end is refused");
        assert!(dev.discard(size, 1).is_err());
        dev.flush().expect("flush");
    }

    #[test]
    fn file_and_memory_devices_behave_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.raw");
        File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("create");
        exercise(&FileDevice::open(&path, false).expect("open"));
        exercise(&MemoryDevice::new(1 << 20));
    }

    #[test]
    fn reads_that_would_wait_for_the_disk_are_told_apart() {
        // Under the temporary directory (a disk file system on these machines) data
        // dropped from the page cache is not read without waiting; on tmpfs, which
        // refuses RWF_NOWAIT and never waits for a disk, every read just reads.
        for dir in [tempfile::tempdir(), tempfile::tempdir_in("/dev/shm")] {
            let dir = dir.expect("tempdir");
            let path = dir.path().join("v.raw");
            let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i / 4096) as u8).collect();
            let file = File::create(&path).expect("create");
            file.write_all_at(&pattern, 0).expect("write");
            file.sync_all().expect("sync");
            // SAFETY: posix_fadvise on a file descriptor we own, plain integers.
            let dropped = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(dropped, 0);
            let on_tmpfs = {
                // SAFETY: a plain C struct, all zeroes is a valid value.
                let mut st: libc::statfs = unsafe { std::mem::zeroed() };
                // SAFETY: fstatfs into a live local of the right type.
                assert_eq!(unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) }, 0);
                st.f_type == libc::TMPFS_MAGIC
            };
            let dev = FileDevice::open(&path, false).expect("open");
            let mut buf = vec![0u8; 8192];
            let first = dev.read_at_if_cached(&mut buf, 0);
            if on_tmpfs {
                first.expect("tmpfs reads just read").expect("read");
                assert_eq!(buf, pattern[..8192]);
                assert!(!dev.nowait_reads.load(Ordering::Relaxed), "tmpfs refuses RWF_NOWAIT");
                continue;
            }
            assert!(first.is_none(), "data not in the page cache would wait");
            // (The attempt started the disk read; a read that waits takes it in.)
            dev.read_at(&mut buf, 0).expect("read");
            buf.fill(0);
            dev.read_at_if_cached(&mut buf, 0)
                .expect("now in memory")
                .expect("read");
            assert_eq!(buf, pattern[..8192]);
            let past_end = dev
                .read_at_if_cached(&mut buf, (1 << 20) - 4096)
                .expect("refused at once");
            assert!(past_end.is_err(), "reads past the end are refused");
        }
    }

    #[test]
    fn read_only_devices_refuse_writes() {
        let dev = ReadOnly(MemoryDevice::new(4096));
        assert!(dev.write_at(&[1], 0).is_err());
        assert!(dev.discard(0, 1).is_err());
        let mut b = [1u8; 16];
        dev.read_at(&mut b, 0).expect("read");
        assert_eq!(b, [0; 16]);
    }
}
