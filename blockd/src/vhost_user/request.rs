//! virtio-blk requests: reading one from a descriptor chain, running it on a
//! [`BlockDevice`], and completing it with a status byte and a used length. Nothing
//! here knows about vhost-user: a queue and guest memory come in, so unit tests drive
//! it with `virtio_queue::mock::MockSplitQueue`.
//!
//! A request is a chain of descriptors (virtio 1.2, 5.2.6): a device-readable 16-byte
//! header (`type: le32, reserved: le32, sector: le64`), the data (device-readable for
//! writes, discard and write-zeroes segments; device-writable for reads and GET_ID),
//! and a last device-writable byte for the status. Everything the guest controls is
//! checked: descriptor addresses (by the `Reader`/`Writer` of virtio-queue), lengths,
//! sector arithmetic and ranges against the device size. A request that fails a check
//! completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type or flag), never
//! a panic.

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use crate::device::{check_range, BlockDevice};

/// Guest memory as the vhost-user daemon maps it (no dirty-page log).
pub(crate) type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// virtio-blk sectors are always 512 bytes, whatever the advertised block size.
pub(crate) const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector le64, num_sectors le32, flags le32.
const SEGMENT_LEN: usize = 16;
/// Data moves through a bounce buffer of at most this size, so one request costs one
/// `read_at`/`write_at` per MiB however many descriptors it has, and a guest cannot
/// make us allocate more by sending a huge chain.
const BOUNCE_MAX: usize = 1 << 20;

/// Limits of discard and write-zeroes requests: advertised in config space and
/// enforced on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLimits {
    /// Largest `num_sectors` of one segment.
    pub max_sectors: u32,
    /// Most segments in one request.
    pub max_segments: u32,
}

/// Why a request failed, and so which status byte the guest gets.
#[derive(Debug)]
enum Failure {
    /// The device failed or the request was malformed or out of range.
    Io(io::Error),
    /// Unknown request type or flag.
    Unsupported,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

fn invalid(msg: String) -> Failure {
    Failure::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

/// The device a connection's queues serve, replaced when the volume grows: each
/// executor checks the generation before every request (one atomic load) and takes
/// the new device when it changed, so no queue needs to be stopped or locked.
#[derive(Debug)]
pub struct SharedDevice {
    generation: AtomicU64,
    device: Mutex<Arc<dyn BlockDevice>>,
}

impl SharedDevice {
    pub fn new(device: Arc<dyn BlockDevice>) -> SharedDevice {
        SharedDevice {
            generation: AtomicU64::new(0),
            device: Mutex::new(device),
        }
    }

    /// Every executor's next request is served by `device`.
    pub fn replace(&self, device: Arc<dyn BlockDevice>) {
        *crate::lock(&self.device) = device;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn current(&self) -> Arc<dyn BlockDevice> {
        crate::lock(&self.device).clone()
    }

    /// How many times the device was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Runs the requests of one virtqueue on a device. One per worker thread: it owns the
/// bounce buffer, so it is used by one thread at a time.
#[derive(Debug)]
pub struct RequestExecutor {
    shared: Arc<SharedDevice>,
    /// `shared`'s device as of `generation`.
    device: Arc<dyn BlockDevice>,
    generation: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    discard: SegmentLimits,
    write_zeroes: SegmentLimits,
    bounce: Vec<u8>,
}

impl RequestExecutor {
    /// An executor for `device`, answering GET_ID with the first 20 bytes of `serial`.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        serial: &str,
        discard: SegmentLimits,
        write_zeroes: SegmentLimits,
    ) -> RequestExecutor {
        Self::on_shared(Arc::new(SharedDevice::new(device)), serial, discard, write_zeroes)
    }

    /// An executor for whatever device `shared` holds at each request.
    pub fn on_shared(
        shared: Arc<SharedDevice>,
        serial: &str,
        discard: SegmentLimits,
        write_zeroes: SegmentLimits,
    ) -> RequestExecutor {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let generation = shared.generation();
        RequestExecutor {
            device: shared.current(),
            generation,
            shared,
            serial: id,
            discard,
            write_zeroes,
            bounce: Vec::new(),
        }
    }

    /// Takes the shared device if it was replaced since the last request.
    fn refresh(&mut self) {
        let generation = self.shared.generation();
        if generation != self.generation {
            self.device = self.shared.current();
            self.generation = generation;
        }
    }

    /// Completes every request available on `queue`: runs it, writes its status and
    /// puts it on the used ring. Returns whether any request was completed. Errors are
    /// those of the rings themselves (a used ring outside guest memory), not of
    /// requests.
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMem) -> Result<bool, virtio_queue::Error> {
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = self.execute(chain);
            queue.add_used(mem, head, used_len)?;
            completed = true;
        }
        Ok(completed)
    }

    /// Runs one request and writes its status byte. Returns the used length: the bytes
    /// written into device-writable buffers, status included (0 when the chain has no
    /// writable byte to put a status in, so nothing was written).
    pub fn execute<M>(&mut self, chain: DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMem> + Clone,
    {
        self.refresh();
        let mem = chain.memory();
        let Ok(mut data_out) = chain.clone().writer(mem) else {
            tracing::debug!("virtio-blk request with writable descriptors outside guest memory");
            return 0;
        };
        let writable = data_out.available_bytes();
        if writable == 0 {
            tracing::debug!("virtio-blk request without a status byte");
            return 0;
        }
        let Ok(mut status_out) = data_out.split_at(writable - 1) else {
            return 0;
        };
        let status = match chain.clone().reader(mem) {
            Ok(mut data_in) => match self.run(&mut data_in, &mut data_out) {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(Failure::Io(e)) => {
                    tracing::debug!("virtio-blk request failed: {e}");
                    VIRTIO_BLK_S_IOERR
                }
                Err(Failure::Unsupported) => VIRTIO_BLK_S_UNSUPP,
            },
            Err(e) => {
                tracing::debug!("virtio-blk request with readable descriptors outside guest memory: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        if status_out.write_all(&[status as u8]).is_err() {
            return 0;
        }
        // Bounded by the chain's length, which virtio-queue checked fits in a u32 sum of
        // descriptor lengths.
        u32::try_from(data_out.bytes_written() + 1).unwrap_or(u32::MAX)
    }

    fn run(&mut self, data_in: &mut Reader<'_>, data_out: &mut Writer<'_>) -> Result<(), Failure> {
        let mut header = [0u8; HEADER_LEN];
        data_in
            .read_exact(&mut header)
            .map_err(|_| invalid(format!("request header shorter than {HEADER_LEN} bytes")))?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match request_type {
            VIRTIO_BLK_T_IN => self.read(sector, data_out),
            VIRTIO_BLK_T_OUT => self.write(sector, data_in),
            VIRTIO_BLK_T_FLUSH => Ok(self.device.flush()?),
            VIRTIO_BLK_T_GET_ID => {
                let n = data_out.available_bytes().min(self.serial.len());
                data_out.write_all(&self.serial[..n])?;
                Ok(())
            }
            VIRTIO_BLK_T_DISCARD => self.segments(data_in, false),
            VIRTIO_BLK_T_WRITE_ZEROES => self.segments(data_in, true),
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte range of `len` bytes at `sector`, checked against the device.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        // Masks, not `%`: both are powers of two, and `is_multiple_of` is newer than the
        // workspace's rust-version.
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(invalid(format!("length {len} is not a multiple of {SECTOR_SIZE}")));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| invalid(format!("sector {sector} is outside the device")))?;
        check_range(self.device.size(), offset, len)?;
        Ok(offset)
    }

    fn refuse_if_read_only(&self) -> Result<(), Failure> {
        if self.device.read_only() {
            return Err(Failure::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the device is read-only",
            )));
        }
        Ok(())
    }

    fn bounce(&mut self, len: u64) -> &mut [u8] {
        let n = len.min(BOUNCE_MAX as u64) as usize;
        if self.bounce.len() < n {
            self.bounce.resize(n, 0);
        }
        &mut self.bounce[..n]
    }

    fn read(&mut self, sector: u64, data_out: &mut Writer<'_>) -> Result<(), Failure> {
        let len = data_out.available_bytes() as u64;
        let offset = self.range(sector, len)?;
        let device = Arc::clone(&self.device);
        let mut done = 0;
        while done < len {
            let buf = self.bounce(len - done);
            device.read_at(buf, offset + done)?;
            data_out.write_all(buf)?;
            done += buf.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, data_in: &mut Reader<'_>) -> Result<(), Failure> {
        self.refuse_if_read_only()?;
        let len = data_in.available_bytes() as u64;
        let offset = self.range(sector, len)?;
        let device = Arc::clone(&self.device);
        let mut done = 0;
        while done < len {
            let buf = self.bounce(len - done);
            data_in.read_exact(buf)?;
            device.write_at(buf, offset + done)?;
            done += buf.len() as u64;
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is applied, so a
    /// request with one bad segment changes nothing.
    fn segments(&mut self, data_in: &mut Reader<'_>, zeroes: bool) -> Result<(), Failure> {
        self.refuse_if_read_only()?;
        let limits = if zeroes { self.write_zeroes } else { self.discard };
        let bytes = data_in.available_bytes();
        if bytes == 0 || bytes & (SEGMENT_LEN - 1) != 0 {
            return Err(invalid(format!(
                "{bytes} bytes of segments, not a multiple of {SEGMENT_LEN}"
            )));
        }
        let count = bytes / SEGMENT_LEN;
        if count > limits.max_segments as usize {
            return Err(invalid(format!(
                "{count} segments, at most {} allowed",
                limits.max_segments
            )));
        }
        let mut ranges = Vec::with_capacity(count);
        for _ in 0..count {
            let mut seg = [0u8; SEGMENT_LEN];
            data_in.read_exact(&mut seg)?;
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(sector);
            let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Discard has no flags; write-zeroes only "unmap" (virtio 1.2, 5.2.6.2).
            let known = if zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !known != 0 {
                return Err(Failure::Unsupported);
            }
            if num_sectors > limits.max_sectors {
                return Err(invalid(format!(
                    "segment of {num_sectors} sectors, at most {} allowed",
                    limits.max_sectors
                )));
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = self.range(sector, len)?;
            ranges.push((offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
        }
        for (offset, len, unmap) in ranges {
            if zeroes {
                self.device.write_zeroes(offset, len, unmap)?;
            } else {
                self.device.discard(offset, len)?;
            }
        }
        Ok(())
    }
}

/// The virtio-blk configuration space (virtio 1.2, 5.2.4), little-endian, up to
/// `write_zeroes_may_unmap` and its padding (60 bytes; later fields stay zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments in one request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size in bytes (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Discard limits (`VIRTIO_BLK_F_DISCARD`).
    pub discard: SegmentLimits,
    /// Discard granularity in sectors.
    pub discard_sector_alignment: u32,
    /// Write-zeroes limits (`VIRTIO_BLK_F_WRITE_ZEROES`).
    pub write_zeroes: SegmentLimits,
    /// Whether write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

/// Bytes of config space we fill in; a frontend asking for more gets zeroes.
pub const CONFIG_SPACE_LEN: usize = 60;

impl ConfigSpace {
    /// The config space as the guest reads it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // 8: size_max (no VIRTIO_BLK_F_SIZE_MAX), 16: geometry: left zero.
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // 24: physical_block_exp, alignment_offset, min_io_size, opt_io_size (topology):
        // zero. 32: writeback, unused0: zero (no VIRTIO_BLK_F_CONFIG_WCE).
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.discard.max_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.discard.max_segments.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.write_zeroes.max_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.write_zeroes.max_segments.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        b
    }

    /// `size` bytes of config space from `offset`, zero past its end (GET_CONFIG).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize).saturating_add(size as usize).min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{MemoryDevice, ReadOnly};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const QUEUE_SIZE: u16 = 16;
    const DEV_SIZE: u64 = 1 << 20;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const LIMITS: SegmentLimits = SegmentLimits {
        max_sectors: 1024,
        max_segments: 4,
    };

    struct Rig {
        mem: GuestMem,
        device: Arc<MemoryDevice>,
    }

    /// One descriptor: (address, length, device-writable).
    type Desc = (u64, u32, bool);

    impl Rig {
        fn new() -> Rig {
            let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("guest memory");
            Rig {
                mem,
                device: Arc::new(MemoryDevice::new(DEV_SIZE)),
            }
        }

        fn header(&self, request_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        }

        /// Puts one chain on a fresh queue, runs the queue on `device`, and returns
        /// (status byte, used length).
        fn submit(&self, device: Arc<dyn BlockDevice>, descs: &[Desc]) -> (u8, u32) {
            let mut exec = RequestExecutor::new(device, "hearth-test-serial-0123456789", LIMITS, LIMITS);
            self.submit_to(&mut exec, descs)
        }

        /// As `submit`, on an executor of the caller's.
        fn submit_to(&self, exec: &mut RequestExecutor, descs: &[Desc]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
            let mock = MockSplitQueue::new(&self.mem, QUEUE_SIZE);
            // Each submit starts from empty rings on the same memory.
            for ring in [mock.avail_addr(), mock.used_addr()] {
                self.mem.write_obj(0u16, ring.unchecked_add(2)).expect("ring idx");
            }
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, writable))| {
                    let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
                })
                .collect();
            mock.add_desc_chains(&raw, 0).expect("chain");
            let mut queue: Queue = mock.create_queue().expect("queue");
            assert!(exec.process_queue(&mut queue, &self.mem).expect("process"));
            let used = mock.used();
            assert_eq!(used.idx().load(), 1, "one request completed");
            let elem = used.ring().ref_at(0).expect("used elem").load();
            assert_eq!(elem.id(), 0, "the used element names the chain's head");
            let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).expect("status");
            (status, elem.len())
        }

        fn dev(&self) -> Arc<dyn BlockDevice> {
            self.device.clone()
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn an_executor_follows_its_shared_device_when_it_is_replaced() {
        let rig = Rig::new();
        let shared = Arc::new(SharedDevice::new(rig.dev()));
        let mut exec = RequestExecutor::on_shared(Arc::clone(&shared), "grown", LIMITS, LIMITS);
        // The first sector past the end of the 1 MiB device.
        rig.header(VIRTIO_BLK_T_IN, DEV_SIZE / 512);
        let d = [(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)];
        assert_eq!(rig.submit_to(&mut exec, &d).0, IOERR);
        shared.replace(Arc::new(MemoryDevice::new(2 * DEV_SIZE)));
        assert_eq!(
            rig.submit_to(&mut exec, &d).0,
            OK,
            "the same executor, the grown device"
        );
    }

    #[test]
    fn write_then_read_across_descriptors() {
        let rig = Rig::new();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        rig.mem.write_slice(&pattern, GuestAddress(DATA)).expect("data");
        rig.header(VIRTIO_BLK_T_OUT, 8);
        // Two data descriptors of 4 KiB each.
        let d = [
            (HDR, 16, false),
            (DATA, 4096, false),
            (DATA + 4096, 4096, false),
            (STATUS, 1, true),
        ];
        assert_eq!(rig.submit(rig.dev(), &d), (OK, 1));
        assert_eq!(&rig.device.to_bytes()[4096..12288], &pattern[..]);

        rig.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).expect("clear");
        rig.header(VIRTIO_BLK_T_IN, 8);
        let d = [
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 512, 7680, true),
            (STATUS, 1, true),
        ];
        assert_eq!(rig.submit(rig.dev(), &d), (OK, 8193), "used length = data + status");
        let mut back = vec![0u8; 8192];
        rig.mem.read_slice(&mut back, GuestAddress(DATA)).expect("read back");
        assert_eq!(back, pattern);
    }

    #[test]
    fn status_may_share_the_last_data_descriptor() {
        let rig = Rig::new();
        rig.device.write_at(&[9u8; 512], 0).expect("fill");
        rig.header(VIRTIO_BLK_T_IN, 0);
        // One writable descriptor of 513 bytes: 512 of data, then the status.
        let d = [(HDR, 16, false), (DATA, 513, true)];
        rig.mem
            .write_obj(0xffu8, GuestAddress(DATA + 512))
            .expect("status slot");
        rig.submit(rig.dev(), &d);
        let status: u8 = rig.mem.read_obj(GuestAddress(DATA + 512)).expect("status");
        assert_eq!(status, OK);
        let first: u8 = rig.mem.read_obj(GuestAddress(DATA)).expect("data");
        assert_eq!(first, 9);
    }

    #[test]
    fn flush_and_get_id() {
        let rig = Rig::new();
        rig.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(rig.submit(rig.dev(), &[(HDR, 16, false), (STATUS, 1, true)]), (OK, 1));

        rig.header(VIRTIO_BLK_T_GET_ID, 0);
        let d = [(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)];
        assert_eq!(rig.submit(rig.dev(), &d), (OK, 21));
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"hearth-test-serial-0", "serials are cut at 20 bytes");
    }

    fn segment(rig: &Rig, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        rig.mem.write_slice(&s, GuestAddress(at)).expect("segment");
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges() {
        let rig = Rig::new();
        rig.device.write_at(&vec![5u8; DEV_SIZE as usize], 0).expect("fill");
        // Discard two segments: sectors 0..8 and 16..24.
        rig.header(VIRTIO_BLK_T_DISCARD, 0);
        segment(&rig, DATA, 0, 8, 0);
        segment(&rig, DATA + 16, 16, 8, 0);
        let d = [(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)];
        assert_eq!(rig.submit(rig.dev(), &d), (OK, 1));
        let bytes = rig.device.to_bytes();
        assert!(bytes[0..4096].iter().all(|&b| b == 0));
        assert!(
            bytes[4096..8192].iter().all(|&b| b == 5),
            "between the segments is untouched"
        );
        assert!(bytes[8192..12288].iter().all(|&b| b == 0));

        // Write zeroes with and without unmap.
        rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&rig, DATA, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
            (OK, 1)
        );
        segment(&rig, DATA, 100, 1, 0);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
            (OK, 1)
        );
        let bytes = rig.device.to_bytes();
        assert!(bytes[4096..8192].iter().all(|&b| b == 0));
        assert!(bytes[51200..51712].iter().all(|&b| b == 0));
        assert!(bytes[51712..52224].iter().all(|&b| b == 5));
    }

    #[test]
    fn bad_segments_change_nothing() {
        let rig = Rig::new();
        rig.device.write_at(&vec![5u8; DEV_SIZE as usize], 0).expect("fill");
        let seg = [(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)];
        // Second segment out of range: the first must not be applied either.
        rig.header(VIRTIO_BLK_T_DISCARD, 0);
        segment(&rig, DATA, 0, 8, 0);
        segment(&rig, DATA + 16, DEV_SIZE / 512, 1, 0);
        assert_eq!(rig.submit(rig.dev(), &seg), (IOERR, 1));
        assert!(rig.device.to_bytes()[0..4096].iter().all(|&b| b == 5));
        // Unmap flag on discard, unknown flag on write-zeroes: unsupported.
        segment(&rig, DATA + 16, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(rig.submit(rig.dev(), &seg), (UNSUPP, 1));
        rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&rig, DATA + 16, 8, 8, 2);
        assert_eq!(rig.submit(rig.dev(), &seg), (UNSUPP, 1));
        // Too many sectors in a segment, too many segments, a torn segment.
        segment(&rig, DATA + 16, 0, LIMITS.max_sectors + 1, 0);
        assert_eq!(rig.submit(rig.dev(), &seg), (IOERR, 1));
        let five = [(HDR, 16, false), (DATA, 80, false), (STATUS, 1, true)];
        assert_eq!(rig.submit(rig.dev(), &five), (IOERR, 1));
        let torn = [(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)];
        assert_eq!(rig.submit(rig.dev(), &torn), (IOERR, 1));
        assert!(rig.device.to_bytes().iter().all(|&b| b == 5));
    }

    #[test]
    fn out_of_range_requests_get_ioerr() {
        let rig = Rig::new();
        let last = DEV_SIZE / 512 - 1;
        // Reading the last sector is fine, one more is not.
        rig.header(VIRTIO_BLK_T_IN, last);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            OK
        );
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // Sector arithmetic that overflows, and writes past the end.
        rig.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        rig.header(VIRTIO_BLK_T_OUT, DEV_SIZE / 512);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            (IOERR, 1)
        );
        // Lengths that are not whole sectors.
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)])
                .0,
            IOERR
        );
        assert!(rig.device.to_bytes().iter().all(|&b| b == 0), "nothing was written");
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let rig = Rig::new();
        rig.header(0x7777, 0);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 16, false), (STATUS, 1, true)]),
            (UNSUPP, 1)
        );
    }

    #[test]
    fn read_only_devices_refuse_changes() {
        let rig = Rig::new();
        let ro: Arc<dyn BlockDevice> = Arc::new(ReadOnly(MemoryDevice::new(DEV_SIZE)));
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.submit(ro.clone(), &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
                .0,
            IOERR
        );
        rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&rig, DATA, 0, 1, 0);
        assert_eq!(
            rig.submit(ro.clone(), &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
                .0,
            IOERR
        );
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.submit(ro.clone(), &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            OK
        );
        rig.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(rig.submit(ro, &[(HDR, 16, false), (STATUS, 1, true)]).0, OK);
    }

    #[test]
    fn short_and_malformed_chains() {
        let rig = Rig::new();
        // Header shorter than 16 bytes.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.submit(rig.dev(), &[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // Header split over two descriptors is fine.
        assert_eq!(
            rig.submit(
                rig.dev(),
                &[
                    (HDR, 8, false),
                    (HDR + 8, 8, false),
                    (DATA, 512, true),
                    (STATUS, 1, true)
                ]
            )
            .0,
            OK
        );
        // No readable header at all: the first descriptor is writable.
        assert_eq!(rig.submit(rig.dev(), &[(STATUS, 1, true)]).0, IOERR);
        // No writable byte: nothing can be reported, the used length is 0.
        assert_eq!(rig.submit(rig.dev(), &[(HDR, 16, false)]).1, 0);
        // A data descriptor outside guest memory.
        assert_eq!(
            rig.submit(
                rig.dev(),
                &[(HDR, 16, false), (0x1_0000_0000, 512, false), (STATUS, 1, true)]
            )
            .0,
            IOERR
        );
        assert_eq!(
            rig.submit(
                rig.dev(),
                &[(HDR, 16, false), (0x3f_ff00, 512, true), (STATUS, 1, true)]
            )
            .1,
            0
        );
    }

    #[test]
    fn large_requests_go_through_the_bounce_buffer_in_pieces() {
        let rig = Rig::new();
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 << 20));
        let pattern: Vec<u8> = (0..(3 << 20) as u32 / 2)
            .flat_map(|i| (i as u16).to_le_bytes())
            .collect();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x80_0000)]).expect("mem");
        let big = Rig {
            mem,
            device: Arc::new(MemoryDevice::new(1)),
        };
        big.mem.write_slice(&pattern, GuestAddress(0x40_0000)).expect("data");
        big.header(VIRTIO_BLK_T_OUT, 1);
        let d = [(HDR, 16, false), (0x40_0000, 3 << 20, false), (STATUS, 1, true)];
        assert_eq!(big.submit(dev.clone(), &d), (OK, 1));
        let mut back = vec![0u8; 3 << 20];
        dev.read_at(&mut back, 512).expect("read");
        assert!(back == pattern);
        drop(rig);
    }

    #[test]
    fn config_space_layout() {
        let c = ConfigSpace {
            capacity: 2048,
            seg_max: 126,
            blk_size: 512,
            num_queues: 4,
            discard: SegmentLimits {
                max_sectors: 0x10_0000,
                max_segments: 32,
            },
            discard_sector_alignment: 8,
            write_zeroes: SegmentLimits {
                max_sectors: 0x20_0000,
                max_segments: 1,
            },
            write_zeroes_may_unmap: true,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &2048u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[20..24], &512u32.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(&b[36..40], &0x10_0000u32.to_le_bytes());
        assert_eq!(&b[40..44], &32u32.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(&b[48..52], &0x20_0000u32.to_le_bytes());
        assert_eq!(&b[52..56], &1u32.to_le_bytes());
        assert_eq!(b[56], 1);
        assert_eq!(c.read(0, 8), 2048u64.to_le_bytes().to_vec());
        assert_eq!(c.read(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0], "zero past the end");
        assert_eq!(c.read(500, 4), vec![0; 4]);
    }
}
