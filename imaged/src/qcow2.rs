//! qcow2 to raw in one pass over the file: the cluster map is read from the L1 and
//! L2 tables first, then the file is read once from start to end, each chunk hashed
//! (the import's digest) on a thread of its own while its data clusters are written
//! to their places in a sparse raw file. `qemu-img convert` reads the file once too,
//! but the digest would then take a second read; doing both in one pass is what
//! makes an import about as fast as a bare conversion.
//!
//! The format is QEMU's `docs/interop/qcow2.txt`: versions 2 and 3, any cluster size,
//! zlib-compressed clusters, zero clusters and extended L2 entries (subclusters).
//! What this reader does not handle (zstd compression, an external data file, feature
//! bits it does not know) is left to `qemu-img` by [`Qcow2Map::open`] returning
//! `None`; backing files and encryption are refused outright.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use crate::store::Sha256;
use crate::ImageError;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bits 9-55 of an L1 entry or a standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// The incompatible feature bits this reader understands: dirty (bit 0: refcounts may
/// be stale, the mapping is fine), compression type (bit 3, zlib only, checked
/// below) and extended L2 entries (bit 4).
const KNOWN_INCOMPATIBLE: u64 = 1 | 1 << 3 | 1 << 4;
const CORRUPT_BIT: u64 = 1 << 1;
/// Larger virtual sizes are refused (QEMU's own limit is lower still).
const MAX_VIRTUAL_SIZE: u64 = 1 << 60;
/// How much of the file one read brings in.
const CHUNK: usize = 8 << 20;
/// Writes of converted data are started towards the disk every this many bytes, so the
/// final flush has little left to do.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// More separate pieces of data than this (a 512 GiB disk of 64 KiB clusters none of
/// which follow each other in the file) are left to qemu-img, to bound the memory the
/// map takes (32 bytes a piece).
const MAX_EXTENTS: usize = 8 << 20;

/// Where the guest's data lies in a qcow2 file.
#[derive(Debug)]
pub struct Qcow2Map {
    pub virtual_size: u64,
    cluster_size: u64,
    file_len: u64,
    /// The pieces of guest data, by host offset.
    extents: Vec<Extent>,
}

/// A run of guest data stored at `host`: `len` bytes to place at `guest`, or, when
/// `compressed`, `len` bytes of deflate stream that inflate to one cluster at `guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    host: u64,
    guest: u64,
    len: u64,
    compressed: bool,
}

impl Extent {
    fn host_end(&self) -> u64 {
        self.host + self.len
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn corrupt(what: impl std::fmt::Display) -> ImageError {
    ImageError::NotADisk(format!("the qcow2 image is damaged: {what}"))
}

fn read_exact_at(f: &File, path: &Path, buf: &mut [u8], off: u64, what: &str) -> Result<(), ImageError> {
    f.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(format!("its {what} at offset {off} lies past the end of the file"))
        } else {
            ImageError::Io(path.to_path_buf(), e)
        }
    })
}

impl Qcow2Map {
    /// Reads the header and the L1 and L2 tables. `Ok(None)`: a qcow2 image this reader
    /// leaves to qemu-img (see the module's notes); the reason is logged.
    pub fn open(f: &File, path: &Path) -> Result<Option<Qcow2Map>, ImageError> {
        let file_len = f.metadata().map_err(|e| ImageError::Io(path.to_path_buf(), e))?.len();
        let mut h = [0u8; 112];
        let n = (file_len as usize).min(h.len());
        read_exact_at(f, path, &mut h[..n], 0, "header")?;
        if n < 72 || &h[..4] != MAGIC {
            return Err(corrupt("the header is cut short"));
        }
        let version = be32(&h, 4);
        let backing_offset = be64(&h, 8);
        let cluster_bits = be32(&h, 20);
        let virtual_size = be64(&h, 24);
        let crypt = be32(&h, 32);
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        if !(2..=3).contains(&version) {
            return Err(ImageError::Unsupported(format!("qcow2 version {version}")));
        }
        if backing_offset != 0 {
            let len = (be32(&h, 16) as usize).min(1023);
            let mut name = vec![0u8; len];
            read_exact_at(f, path, &mut name, backing_offset, "backing file name")?;
            return Err(ImageError::Unsupported(format!(
                "the qcow2 image has a backing file ({}); import a standalone image (qemu-img convert -O qcow2)",
                String::from_utf8_lossy(&name)
            )));
        }
        if crypt != 0 {
            return Err(ImageError::Unsupported(
                "encrypted qcow2 images are not supported".into(),
            ));
        }
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!("cluster size 2^{cluster_bits}")));
        }
        let mut extended_l2 = false;
        if version == 3 {
            if n < 104 {
                return Err(corrupt("the version 3 header is cut short"));
            }
            let incompatible = be64(&h, 72);
            let header_len = be32(&h, 100) as usize;
            if incompatible & CORRUPT_BIT != 0 {
                return Err(corrupt("QEMU marked it corrupt; repair it with qemu-img check -r all"));
            }
            if incompatible & !KNOWN_INCOMPATIBLE != 0 {
                tracing::info!(
                    incompatible,
                    "qcow2 features this reader does not handle; converting with qemu-img"
                );
                return Ok(None);
            }
            if incompatible & (1 << 3) != 0 && header_len > 104 && h[104] != 0 {
                tracing::info!(
                    compression = h[104],
                    "qcow2 compression other than zlib; converting with qemu-img"
                );
                return Ok(None);
            }
            extended_l2 = incompatible & (1 << 4) != 0;
        }
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(ImageError::Unsupported(format!(
                "a virtual size of {virtual_size} bytes is more than hearth handles (1 EiB)"
            )));
        }
        if extended_l2 && cluster_bits < 14 {
            tracing::info!(
                cluster_bits,
                "extended L2 entries with clusters under 16 KiB; converting with qemu-img"
            );
            return Ok(None);
        }
        let cluster_size = 1u64 << cluster_bits;
        let entry_len: u64 = if extended_l2 { 16 } else { 8 };
        let l2_entries = cluster_size / entry_len;
        let per_l1 = cluster_size * l2_entries;
        let l1_needed = virtual_size.div_ceil(per_l1);
        if l1_size < l1_needed {
            return Err(corrupt(format!(
                "its L1 table has {l1_size} entries, {l1_needed} are needed for {virtual_size} bytes"
            )));
        }
        if l1_offset % cluster_size != 0 {
            return Err(corrupt("its L1 table is not cluster aligned"));
        }
        if l1_offset.checked_add(l1_needed * 8).is_none_or(|end| end > file_len) {
            return Err(corrupt(format!(
                "its L1 table for {virtual_size} bytes lies past the end of the file"
            )));
        }
        let mut l1 = vec![0u8; (l1_needed * 8) as usize];
        read_exact_at(f, path, &mut l1, l1_offset, "L1 table")?;

        let mut map = Qcow2Map {
            virtual_size,
            cluster_size,
            file_len,
            extents: Vec::new(),
        };
        let mut l2 = vec![0u8; cluster_size as usize];
        // Each L2 table is read once: a file whose L1 names one table many times would
        // otherwise cost a read of it per name.
        let mut seen = std::collections::HashSet::new();
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let l2_offset = u64::from_be_bytes(e.try_into().expect("8 bytes")) & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if l2_offset % cluster_size != 0 {
                return Err(corrupt(format!("L2 table {i} is not cluster aligned")));
            }
            if !seen.insert(l2_offset) {
                return Err(corrupt(format!("L2 table {i} is also another part's table")));
            }
            read_exact_at(f, path, &mut l2, l2_offset, "L2 table")?;
            let base = i as u64 * per_l1;
            for j in 0..l2_entries {
                let guest = base + j * cluster_size;
                if guest >= virtual_size {
                    break;
                }
                let at = (j * entry_len) as usize;
                let entry = be64(&l2, at);
                let bitmap = if extended_l2 { be64(&l2, at + 8) } else { 0 };
                match map.add_cluster(guest, entry, bitmap, cluster_bits, extended_l2) {
                    Err(ImageError::Unsupported(_)) => {
                        tracing::info!("qcow2 image in more than {MAX_EXTENTS} pieces; converting with qemu-img");
                        return Ok(None);
                    }
                    r => r?,
                }
            }
        }
        map.extents.sort_unstable_by_key(|e| (e.host, e.guest));
        Ok(Some(map))
    }

    fn push(&mut self, e: Extent) -> Result<(), ImageError> {
        if e.compressed {
            if e.host >= self.file_len {
                return Err(corrupt(format!("a compressed cluster at {} lies past the end", e.host)));
            }
        } else if e.host_end() > self.file_len {
            return Err(corrupt(format!(
                "data for guest offset {} lies past the end of the file",
                e.guest
            )));
        }
        // Guest and host both continue the last piece: one longer piece.
        if let Some(last) = self.extents.last_mut() {
            if !e.compressed && !last.compressed && last.host_end() == e.host && last.guest + last.len == e.guest {
                last.len += e.len;
                return Ok(());
            }
        }
        if self.extents.len() >= MAX_EXTENTS {
            return Err(ImageError::Unsupported("too many pieces for the map".into()));
        }
        self.extents.push(e);
        Ok(())
    }

    fn add_cluster(
        &mut self,
        guest: u64,
        entry: u64,
        bitmap: u64,
        cluster_bits: u32,
        extended_l2: bool,
    ) -> Result<(), ImageError> {
        let cs = self.cluster_size;
        let len = cs.min(self.virtual_size - guest);
        if entry & L2_COMPRESSED != 0 {
            // Bits 0..x-1: the host offset; x..61: the count of further 512-byte sectors.
            let x = 62 - (cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            let clen = sectors * 512 - (host & 511);
            return self.push(Extent {
                host,
                guest,
                len: clen.min(self.file_len.saturating_sub(host)),
                compressed: true,
            });
        }
        let host = entry & OFFSET_MASK;
        if !extended_l2 {
            // Unallocated or a zero cluster reads as zeros: nothing to write.
            if host == 0 || entry & L2_ZERO != 0 {
                return Ok(());
            }
            if host % cs != 0 {
                return Err(corrupt(format!("the cluster for guest offset {guest} is not aligned")));
            }
            return self.push(Extent {
                host,
                guest,
                len,
                compressed: false,
            });
        }
        // 32 subclusters: bit i allocated, bit 32+i reads as zeros.
        let sub = cs / 32;
        let allocated = bitmap & 0xffff_ffff & !(bitmap >> 32);
        if allocated != 0 && (host == 0 || host % cs != 0) {
            return Err(corrupt(format!(
                "subclusters for guest offset {guest} have no aligned host cluster"
            )));
        }
        for i in 0..32u64 {
            if allocated & (1 << i) != 0 && i * sub < len {
                self.push(Extent {
                    host: host + i * sub,
                    guest: guest + i * sub,
                    len: sub.min(len - i * sub),
                    compressed: false,
                })?;
            }
        }
        Ok(())
    }

    /// Bytes of guest data the file holds (compressed clusters count as a cluster).
    pub fn data_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| if e.compressed { self.cluster_size } else { e.len })
            .sum()
    }

    /// Writes the guest disk into `dst` (sparse, `virtual_size` long) and, when
    /// `hasher` is given, feeds it every byte of the qcow2 file. `progress` gets the
    /// bytes of the file read so far.
    pub fn convert(
        &self,
        src: &File,
        path: &Path,
        dst: &File,
        dst_path: &Path,
        hasher: Option<Sha256>,
        progress: &dyn Fn(u64),
    ) -> Result<Option<Sha256>, ImageError> {
        let io_src = |e| ImageError::Io(path.to_path_buf(), e);
        // SAFETY: advice on a descriptor we hold open; failure only loses read-ahead.
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(src), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        // Hashing runs beside the reads and writes, fed the same buffers; buffers come
        // back through `free` when both are done with them.
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..4 {
            free_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
        }
        let recycle = |buf: Arc<Vec<u8>>, free: &mpsc::Sender<Vec<u8>>| {
            if let Some(v) = Arc::into_inner(buf) {
                let _ = free.send(v);
            }
        };
        std::thread::scope(|scope| {
            let (hash_tx, hash_rx) = mpsc::sync_channel::<(Arc<Vec<u8>>, usize)>(2);
            let hashing = hasher.map(|mut h| {
                let free = free_tx.clone();
                scope.spawn(move || {
                    for (buf, n) in hash_rx {
                        h.update(&buf[..n]);
                        recycle(buf, &free);
                    }
                    h
                })
            });
            let mut writer = Writer::new(self, dst, dst_path);
            let mut off = 0u64;
            let result = loop {
                if off >= self.file_len {
                    break Ok(());
                }
                // A buffer comes back once hashed and written; a hashing thread that died
                // (it cannot, short of a bug) must not leave this waiting for ever.
                let buf = loop {
                    match free_rx.recv_timeout(std::time::Duration::from_millis(200)) {
                        Ok(b) => break Some(b),
                        Err(_) if hashing.as_ref().is_some_and(|h| h.is_finished()) => break None,
                        Err(_) => {}
                    }
                };
                let Some(mut buf) = buf else {
                    break Err(ImageError::Corrupt("the hashing thread stopped".into()));
                };
                let n = (self.file_len - off).min(CHUNK as u64) as usize;
                if let Err(e) = src.read_exact_at(&mut buf[..n], off).map_err(io_src) {
                    break Err(e);
                }
                let buf = Arc::new(buf);
                if hashing.is_some() && hash_tx.send((buf.clone(), n)).is_err() {
                    break Err(ImageError::Corrupt("the hashing thread stopped".into()));
                }
                if let Err(e) = writer.place(off, &buf[..n]) {
                    break Err(e);
                }
                recycle(buf, &free_tx);
                off += n as u64;
                progress(off);
            };
            drop(hash_tx);
            let hashed = hashing.map(|t| {
                t.join()
                    .map_err(|_| ImageError::Corrupt("the hashing thread panicked".into()))
            });
            result?;
            writer.finish()?;
            hashed.transpose()
        })
    }
}

/// Converts the qcow2 image at `src` to a sparse raw file at `dst`, hashing the qcow2
/// file on the way when `hash` is set. Returns the virtual size and the digest (hex),
/// or `None` when the image is one for qemu-img (nothing is written then). On an error
/// `dst` may hold part of the disk; the caller removes it.
pub fn to_raw(
    src: &Path,
    dst: &Path,
    hash: bool,
    progress: &dyn Fn(u64),
) -> Result<Option<(u64, Option<String>)>, ImageError> {
    let f = File::open(src).map_err(|e| ImageError::Io(src.to_path_buf(), e))?;
    let Some(map) = Qcow2Map::open(&f, src)? else {
        return Ok(None);
    };
    let needed = map.data_bytes();
    let parent = dst.parent().unwrap_or(Path::new("."));
    let free = free_bytes(parent).map_err(|e| ImageError::Io(parent.to_path_buf(), e))?;
    if needed > free {
        return Err(ImageError::Invalid(format!(
            "the image's disk holds {needed} bytes of data and the image store has {free} bytes free"
        )));
    }
    let out = File::create(dst).map_err(|e| ImageError::Io(dst.to_path_buf(), e))?;
    let hasher = map.convert(&f, src, &out, dst, hash.then(Sha256::new), progress)?;
    Ok(Some((
        map.virtual_size,
        hasher.map(|h| crate::store::hex(&h.finalize())),
    )))
}

/// Bytes an unprivileged writer may still put in the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Places the data of each chunk of the file in the raw output.
struct Writer<'a> {
    map: &'a Qcow2Map,
    dst: &'a File,
    dst_path: &'a Path,
    /// The next extent (by host offset) not yet begun.
    next: usize,
    /// Extents begun in an earlier chunk and not finished.
    open: Vec<usize>,
    /// The previous chunk's bytes from `carry_at` on, while a compressed cluster that
    /// begins there is open. A compressed cluster (at most 4 MiB) is shorter than a
    /// chunk, so it spans two chunks at most, however many entries name it.
    carry: Vec<u8>,
    carry_at: u64,
    /// A compressed cluster put together from `carry` and the next chunk.
    stream: Vec<u8>,
    inflate: flate2::Decompress,
    cluster: Vec<u8>,
    unflushed: u64,
}

const _: () = assert!(CHUNK > (4 << 20) + 512, "a compressed cluster must fit in a chunk");

impl<'a> Writer<'a> {
    fn new(map: &'a Qcow2Map, dst: &'a File, dst_path: &'a Path) -> Writer<'a> {
        Writer {
            map,
            dst,
            dst_path,
            next: 0,
            open: Vec::new(),
            carry: Vec::new(),
            carry_at: 0,
            stream: Vec::new(),
            inflate: flate2::Decompress::new(false),
            cluster: vec![0u8; map.cluster_size as usize],
            unflushed: 0,
        }
    }

    /// `data` is the file's bytes from `off`.
    fn place(&mut self, off: u64, data: &[u8]) -> Result<(), ImageError> {
        let end = off + data.len() as u64;
        let mut open = std::mem::take(&mut self.open);
        while self.next < self.map.extents.len() && self.map.extents[self.next].host < end {
            open.push(self.next);
            self.next += 1;
        }
        let mut still_open = Vec::new();
        let mut carry = std::mem::take(&mut self.carry);
        for i in open {
            let e = self.map.extents[i];
            let from = e.host.max(off);
            let to = e.host_end().min(end);
            let piece = &data[(from - off) as usize..(to - off) as usize];
            if !e.compressed {
                self.write(piece, e.guest + (from - e.host))?;
                if to < e.host_end() {
                    still_open.push(i);
                }
            } else if to < e.host_end() {
                still_open.push(i);
            } else if e.host >= off {
                self.inflate_cluster(&e, piece)?;
            } else {
                // Begun in the previous chunk: its first part was kept in `carry`.
                let head = e
                    .host
                    .checked_sub(self.carry_at)
                    .and_then(|at| carry.get(at as usize..))
                    .ok_or_else(|| corrupt("a compressed cluster spans more than two chunks"))?;
                let mut stream = std::mem::take(&mut self.stream);
                stream.clear();
                stream.extend_from_slice(head);
                stream.extend_from_slice(piece);
                let r = self.inflate_cluster(&e, &stream);
                self.stream = stream;
                r?;
            }
        }
        carry.clear();
        let keep_from = still_open
            .iter()
            .map(|&i| self.map.extents[i])
            .filter(|e| e.compressed)
            .map(|e| e.host)
            .min();
        if let Some(start) = keep_from {
            carry.extend_from_slice(&data[(start - off) as usize..]);
            self.carry_at = start;
        }
        self.carry = carry;
        self.open = still_open;
        Ok(())
    }

    fn inflate_cluster(&mut self, e: &Extent, stream: &[u8]) -> Result<(), ImageError> {
        self.inflate.reset(false);
        let status = self
            .inflate
            .decompress(stream, &mut self.cluster, flate2::FlushDecompress::Finish);
        // QEMU's rule: the cluster must come out whole; bytes after the stream's end
        // are padding to the sector.
        if status.is_err() || self.inflate.total_out() != self.map.cluster_size {
            return Err(corrupt(format!(
                "the compressed cluster for guest offset {} does not inflate to a cluster",
                e.guest
            )));
        }
        let len = self.map.cluster_size.min(self.map.virtual_size - e.guest) as usize;
        let cluster = std::mem::take(&mut self.cluster);
        let r = self.write(&cluster[..len], e.guest);
        self.cluster = cluster;
        r
    }

    /// Writes `data` at `at`, leaving 4 KiB blocks (aligned in the disk) of zeros as
    /// holes.
    fn write(&mut self, data: &[u8], at: u64) -> Result<(), ImageError> {
        const BLOCK: u64 = 4096;
        let block_end = |i: usize| (((at + i as u64) / BLOCK + 1) * BLOCK - at).min(data.len() as u64) as usize;
        let mut i = 0;
        while i < data.len() {
            // Skip blocks of zeros, then write the run of blocks that hold data.
            while i < data.len() && is_zero(&data[i..block_end(i)]) {
                i = block_end(i);
            }
            let start = i;
            while i < data.len() && !is_zero(&data[i..block_end(i)]) {
                i = block_end(i);
            }
            if i > start {
                self.dst
                    .write_all_at(&data[start..i], at + start as u64)
                    .map_err(|e| ImageError::Io(self.dst_path.to_path_buf(), e))?;
                self.unflushed += (i - start) as u64;
            }
        }
        if self.unflushed >= WRITEBACK_EVERY {
            self.unflushed = 0;
            start_writeback(self.dst);
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ImageError> {
        if let Some(&i) = self.open.first() {
            return Err(corrupt(format!(
                "data for guest offset {} runs past the end of the file",
                self.map.extents[i].guest
            )));
        }
        self.dst
            .set_len(self.map.virtual_size)
            .map_err(|e| ImageError::Io(self.dst_path.to_path_buf(), e))
    }
}

/// Starts writing the file's dirty pages to disk without waiting for them.
fn start_writeback(f: &File) {
    // SAFETY: a hint on a descriptor we hold open; no memory is involved.
    unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

fn is_zero(b: &[u8]) -> bool {
    // OR-ing 64 bytes at a time compiles to vector instructions.
    b.chunks(64).all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_told_apart() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[7] = 9;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0u8; 13]));
    }
}
