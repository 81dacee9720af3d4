//! vhost-user-blk: serves a [`BlockDevice`] to a VM over a Unix socket, on rust-vmm's
//! `vhost-user-backend`.
//!
//! How it fits together:
//! 1. [`VhostUserBlkExport::start`] binds the socket and starts one accept thread.
//! 2. For each frontend (a QEMU or Cloud Hypervisor process) that connects, the thread
//!    builds a fresh [`VhostUserDaemon`] with a fresh [`BlkBackend`]: the vhost-user
//!    protocol state (memory table, vring addresses, negotiated features) belongs to one
//!    connection, and starting from nothing is what a rebooted or new VM expects.
//!    The daemon runs one worker thread per virtqueue (`queues_per_thread`), each with its
//!    own [`RequestExecutor`], so queues never wait on each other.
//! 3. When the frontend goes away the daemon ends, its workers are joined, and the thread
//!    goes back to accepting: the socket keeps serving until [`VhostUserBlkExport::stop`].
//!
//! Requests themselves (parsing, bounds checks, status bytes) live in [`request`].

mod request;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend as FrontendChannel, Error as ProtocolError, Listener, VhostUserFrontendReqHandler};
use vhost_user_backend::{
    Error as DaemonError, ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::EventFd;

pub use request::{ConfigSpace, RequestExecutor, SegmentLimits, SharedDevice, CONFIG_SPACE_LEN};
use request::{GuestMem, SECTOR_SIZE};

use crate::device::BlockDevice;
use crate::lock;

/// Most queues: `queues_per_thread` is a 64-bit mask per worker.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue a frontend may set up.
const MAX_QUEUE_SIZE: usize = 1024;

/// How a device is presented to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBlkOptions {
    /// Request queues (`VIRTIO_BLK_F_MQ`), each served by its own thread. 1 to 64.
    pub num_queues: u16,
    /// What GET_ID answers (the guest's `/sys/block/vdX/serial`); cut at 20 bytes.
    pub serial: String,
    /// Logical block size advertised (`VIRTIO_BLK_F_BLK_SIZE`): a power of two from 512
    /// to 65536. Addressing stays in 512-byte sectors whatever it is.
    pub block_size: u32,
    /// Most data segments per request (`VIRTIO_BLK_F_SEG_MAX`). It must leave room for
    /// the header and status in the smallest queue a frontend uses: QEMU's default
    /// `queue-size` is 128, hence 126.
    pub seg_max: u32,
    /// Discard limits.
    pub discard: SegmentLimits,
    /// Write-zeroes limits.
    pub write_zeroes: SegmentLimits,
    /// After completing requests, keep looking for new ones for this long before
    /// interrupting the guest, so that a guest submitting a stream of requests gets
    /// one interrupt for many of them instead of one each (interrupts are what a guest
    /// pays most for, under TCG above all). 0 signals at once. Costs host CPU while
    /// the queue is busy, never while it is idle.
    pub poll_us: u32,
}

impl Default for VhostUserBlkOptions {
    fn default() -> VhostUserBlkOptions {
        VhostUserBlkOptions {
            num_queues: 1,
            serial: "hearth".to_string(),
            block_size: 512,
            seg_max: 126,
            // 1 GiB per segment: large enough that Linux rarely splits, small enough that a
            // zero-filling fallback finishes within a guest's I/O timeout.
            discard: SegmentLimits {
                max_sectors: (1 << 30) / 512,
                max_segments: 32,
            },
            write_zeroes: SegmentLimits {
                max_sectors: (1 << 30) / 512,
                max_segments: 1,
            },
            poll_us: 100,
        }
    }
}

impl VhostUserBlkOptions {
    fn validate(&self) -> io::Result<()> {
        let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return bad(format!("num_queues {} is not in 1..={MAX_QUEUES}", self.num_queues));
        }
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return bad(format!(
                "block_size {} is not a power of two in 512..=65536",
                self.block_size
            ));
        }
        if self.seg_max == 0 || self.seg_max as usize > MAX_QUEUE_SIZE - 2 {
            return bad(format!("seg_max {} is not in 1..={}", self.seg_max, MAX_QUEUE_SIZE - 2));
        }
        for (name, l) in [("discard", self.discard), ("write_zeroes", self.write_zeroes)] {
            if l.max_sectors == 0 || l.max_segments == 0 {
                return bad(format!("{name} limits must be at least one sector and one segment"));
            }
        }
        Ok(())
    }
}

/// The virtio feature bits offered for `device` (before vhost-user's own
/// `PROTOCOL_FEATURES` bit).
pub fn virtio_features(device: &dyn BlockDevice) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_MQ);
    if device.read_only() {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        // A guest cannot discard or zero a read-only disk: do not offer it the commands.
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// The config space the guest reads for `device`.
pub fn config_space(device: &dyn BlockDevice, options: &VhostUserBlkOptions) -> ConfigSpace {
    ConfigSpace {
        capacity: device.size() / SECTOR_SIZE,
        seg_max: options.seg_max,
        blk_size: options.block_size,
        num_queues: options.num_queues,
        discard: options.discard,
        // Discard granularity: one logical block, at least 4 KiB (a file's hole punching
        // frees whole file-system blocks only).
        discard_sector_alignment: options.block_size.max(4096) / SECTOR_SIZE as u32,
        write_zeroes: options.write_zeroes,
        write_zeroes_may_unmap: true,
    }
}

/// The `vhost-user-backend` side of one connection: features, config space, and the
/// per-queue workers.
struct BlkBackend {
    features: u64,
    /// What the queues serve: the export's device, replaced when the volume grows.
    device: Arc<SharedDevice>,
    /// The config space but for the capacity, which is the device's at each read.
    config: ConfigSpace,
    /// The back-end channel, once the frontend gave one (`SET_BACKEND_REQ_FD`): how a
    /// running VM is told that its disk grew.
    frontend: Mutex<Option<FrontendChannel>>,
    num_queues: usize,
    poll: Duration,
    /// One executor per worker thread (= per queue); each thread only locks its own.
    executors: Vec<Mutex<RequestExecutor>>,
    mem: GuestMemoryAtomic<GuestMem>,
}

impl BlkBackend {
    fn new(device: &Arc<SharedDevice>, options: &VhostUserBlkOptions, mem: GuestMemoryAtomic<GuestMem>) -> BlkBackend {
        let current = device.current();
        let executors = (0..options.num_queues)
            .map(|_| {
                Mutex::new(RequestExecutor::on_shared(
                    Arc::clone(device),
                    &options.serial,
                    options.discard,
                    options.write_zeroes,
                ))
            })
            .collect();
        BlkBackend {
            features: virtio_features(current.as_ref()),
            device: Arc::clone(device),
            config: config_space(current.as_ref(), options),
            frontend: Mutex::new(None),
            num_queues: options.num_queues as usize,
            poll: Duration::from_micros(u64::from(options.poll_us)),
            executors,
            mem,
        }
    }

    /// Tells the frontend that the device grew (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`),
    /// which makes it read the config space again and interrupt the guest. False when
    /// the frontend gave no back-end channel: the guest then sees the new size when it
    /// next connects.
    fn tell_frontend(&self) -> io::Result<bool> {
        let Some(frontend) = lock(&self.frontend).clone() else {
            return Ok(false);
        };
        frontend
            .handle_config_change()
            .map_err(|e| io::Error::other(format!("telling the frontend of the new capacity: {e}")))?;
        Ok(true)
    }

    /// Completes everything on `vring` and tells the guest. With EVENT_IDX the guest may
    /// add requests without kicking while we work, so after re-enabling notifications the
    /// queue is checked once more (virtio-queue's documented loop). Between draining the
    /// queue and signalling, the queue is polled for `self.poll` (see
    /// [`VhostUserBlkOptions::poll_us`]).
    fn process_vring(&self, vring: &VringRwLock<GuestMemoryAtomic<GuestMem>>, thread: usize) -> io::Result<()> {
        let queue_error = |e: virtio_queue::Error| io::Error::other(format!("virtqueue {thread}: {e}"));
        let executor = self
            .executors
            .get(thread)
            .ok_or_else(|| io::Error::other(format!("no executor for worker {thread}")))?;
        let mut executor = lock(executor);
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        loop {
            let queue = state.get_queue_mut();
            queue.disable_notification(&*mem).map_err(queue_error)?;
            let mut completed = executor.process_queue(queue, &mem).map_err(queue_error)?;
            if completed && !self.poll.is_zero() {
                let mut last_work = Instant::now();
                while last_work.elapsed() < self.poll {
                    if executor.process_queue(queue, &mem).map_err(queue_error)? {
                        last_work = Instant::now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            completed |= executor.process_queue(queue, &mem).map_err(queue_error)?;
            if completed && queue.needs_notification(&*mem).map_err(queue_error)? {
                state.signal_used_queue()?;
            }
            if !state.get_queue_mut().enable_notification(&*mem).map_err(queue_error)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, frontend: FrontendChannel) {
        *lock(&self.frontend) = Some(frontend);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag (`set_queue_event_idx`), and `needs_notification`
        // reads it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = ConfigSpace {
            capacity: self.device.current().size() / SECTOR_SIZE,
            ..self.config.clone()
        };
        config.read(offset, size)
    }

    fn set_config(&self, offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing is writable: no VIRTIO_BLK_F_CONFIG_WCE.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("virtio-blk config space is read-only (write at offset {offset})"),
        ))
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is the same atomic the daemon swaps the new map into.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The daemon keeps the notifier and fires it when the connection's handler is
        // dropped, which ends and joins the worker.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("vhost-user-blk: cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {thread_id}"
            )));
        }
        // Each worker owns exactly one vring, so the event is always its index 0.
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("event {device_event} names no vring")))?;
        self.process_vring(vring, thread_id)
    }
}

/// State shared between an export's handle and its accept thread.
#[derive(Debug)]
struct ExportState {
    stopping: AtomicBool,
    connected: AtomicBool,
    connections: AtomicU64,
    stop_event: EventFd,
    /// Ends the current connection; set while a frontend is connected.
    current: Mutex<Option<ShutdownHandleDebug>>,
    /// The current connection's backend, to tell its frontend the device grew; set
    /// while a frontend is connected.
    live: Mutex<Option<BackendDebug>>,
    /// What every connection serves (see [`VhostUserBlkExport::set_device`]).
    device: Arc<SharedDevice>,
}

impl ExportState {
    /// Tells the connected frontend, if any, that the device grew. See
    /// [`VhostUserBlkExport::set_device`].
    fn tell_frontend(&self) -> io::Result<bool> {
        let live = lock(&self.live).as_ref().map(|b| Arc::clone(&b.0));
        match live {
            Some(backend) => backend.tell_frontend(),
            None => Ok(false),
        }
    }
}

/// A connection's backend, wrapped so the state can derive `Debug`.
struct BackendDebug(Arc<BlkBackend>);

impl std::fmt::Debug for BackendDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlkBackend")
    }
}

/// `ShutdownHandle` without `Debug`, wrapped so the state can derive it.
struct ShutdownHandleDebug(ShutdownHandle);

impl std::fmt::Debug for ShutdownHandleDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

/// A block device served on a vhost-user-blk socket, to one frontend at a time, for as
/// long as the export lives. Dropping it stops it.
#[derive(Debug)]
pub struct VhostUserBlkExport {
    socket_path: PathBuf,
    state: Arc<ExportState>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserBlkExport {
    /// Binds `socket_path` (replacing a stale socket left there, refusing any other kind
    /// of file) and serves `device` on it from a thread of its own.
    pub fn start(
        socket_path: &Path,
        device: Arc<dyn BlockDevice>,
        options: VhostUserBlkOptions,
    ) -> io::Result<VhostUserBlkExport> {
        options.validate()?;
        match std::fs::symlink_metadata(socket_path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(socket_path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", socket_path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = Listener::new(socket_path, false)
            .map_err(|e| io::Error::other(format!("cannot listen on {}: {e}", socket_path.display())))?;
        let state = Arc::new(ExportState {
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stop_event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            current: Mutex::new(None),
            live: Mutex::new(None),
            device: Arc::new(SharedDevice::new(device)),
        });
        let name = format!("vhost-user-blk:{}", socket_path.display());
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".to_string())
            .spawn(move || accept_loop(name, listener, options, thread_state))?;
        Ok(VhostUserBlkExport {
            socket_path: socket_path.to_path_buf(),
            state,
            thread: Some(thread),
        })
    }

    /// Where frontends connect.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The size of the device served now, in bytes.
    pub fn device_size(&self) -> u64 {
        self.state.device.current().size()
    }

    /// True while a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Acquire)
    }

    /// Serves `device`, the same volume re-opened after it grew, from now on: to the
    /// frontend connected now, which is told of the new capacity (its guest sees it at
    /// once), and to those that connect later. Returns whether a connected frontend was
    /// told: false when none is connected, or when it gave no back-end channel (its
    /// guest then sees the new size when the VM next starts).
    pub fn set_device(&self, device: Arc<dyn BlockDevice>) -> io::Result<bool> {
        self.state.device.replace(device);
        self.state.tell_frontend()
    }

    /// What to call when the served device grew by itself (an NBD export whose owner
    /// grew it, noticed at a reconnection): the connected frontend is told, as by
    /// [`VhostUserBlkExport::set_device`]. It may run inside a queue's request (the
    /// one that reconnected): telling waits for no queue. Does nothing once the export
    /// is gone.
    pub fn growth_notifier(&self) -> impl Fn() + Send + Sync + 'static {
        let state = Arc::downgrade(&self.state);
        move || {
            let Some(state) = state.upgrade() else {
                return;
            };
            // The device is the same; its size is what changed.
            match state.tell_frontend() {
                Ok(told) => tracing::info!(told, "vhost-user-blk: the device grew"),
                Err(e) => tracing::warn!("vhost-user-blk: the device grew: {e}"),
            }
        }
    }

    /// How many frontends have connected since the start.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Acquire)
    }

    /// Disconnects the frontend if there is one, ends every thread of the export, and
    /// removes the socket. The guest sees its disk stop answering, as when a storage
    /// daemon dies: stop an export after the VM, not before.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.state.stopping.store(true, Ordering::Release);
        self.state.stop_event.write(1)?;
        if let Some(current) = lock(&self.state.current).as_ref() {
            current.0.shutdown();
        }
        thread
            .join()
            .map_err(|_| io::Error::other("the vhost-user-blk accept thread panicked"))?;
        // The listener removed the socket when the thread dropped it; this covers a
        // socket someone else re-created meanwhile only if it is still ours to remove.
        match std::fs::remove_file(&self.socket_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("stopping vhost-user-blk export {}: {e}", self.socket_path.display());
        }
    }
}

const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// Waits for frontends one after the other until the export is stopped.
fn accept_loop(name: String, mut listener: Listener, options: VhostUserBlkOptions, state: Arc<ExportState>) {
    let epoll = match wait_set(&listener, &state.stop_event) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{name}: cannot wait for connections: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    while !state.stopping.load(Ordering::Acquire) {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name}: waiting for connections failed: {e}");
                return;
            }
        };
        let events = &events[..n];
        if events.iter().any(|e| e.data() == STOP_TOKEN) {
            return;
        }
        match serve_connection(&name, &mut listener, &options, &state) {
            Ok(()) => tracing::info!("{name}: frontend disconnected"),
            Err(e) => tracing::warn!("{name}: connection ended: {e}"),
        }
    }
}

fn wait_set(listener: &Listener, stop: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    Ok(epoll)
}

/// Accepts one frontend (the listener is readable) and serves it until it goes away.
fn serve_connection(
    name: &str,
    listener: &mut Listener,
    options: &VhostUserBlkOptions,
    state: &ExportState,
) -> Result<(), DaemonError> {
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let generation = state.device.generation();
    let backend = Arc::new(BlkBackend::new(&state.device, options, mem.clone()));
    let mut daemon = VhostUserDaemon::new(name.to_string(), Arc::clone(&backend), mem)?;
    daemon.start(listener)?;
    state.connections.fetch_add(1, Ordering::AcqRel);
    if let Some(handle) = daemon.shutdown_handle() {
        *lock(&state.current) = Some(ShutdownHandleDebug(handle));
    }
    *lock(&state.live) = Some(BackendDebug(Arc::clone(&backend)));
    // Grown before `live` was set (so `set_device` told nobody), perhaps after the
    // frontend read the config space: told now, as a resize would.
    if state.device.generation() != generation {
        if let Err(e) = backend.tell_frontend() {
            tracing::warn!("{name}: {e}");
        }
    }
    state.connected.store(true, Ordering::Release);
    tracing::info!("{name}: frontend connected");
    // stop() may have run between accept and storing the handle.
    if state.stopping.load(Ordering::Acquire) {
        daemon.request_shutdown();
    }
    let result = daemon.wait();
    lock(&state.current).take();
    lock(&state.live).take();
    state.connected.store(false, Ordering::Release);
    // Dropping the daemon drops the connection's handler, which stops and joins the
    // queue workers before the next frontend is accepted.
    drop(daemon);
    match result {
        // A frontend that exits mid-message is a VM being killed or powered off.
        Err(DaemonError::HandleRequest(ProtocolError::Disconnected | ProtocolError::PartialMessage)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{MemoryDevice, ReadOnly};

    #[test]
    fn features_follow_the_device() {
        let rw = virtio_features(&MemoryDevice::new(4096));
        let ro = virtio_features(&ReadOnly(MemoryDevice::new(4096)));
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(rw & (1 << bit), 0);
            assert_ne!(ro & (1 << bit), 0);
        }
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn config_space_reports_capacity_and_queues() {
        let opts = VhostUserBlkOptions {
            num_queues: 3,
            ..Default::default()
        };
        let c = config_space(&MemoryDevice::new(1 << 20), &opts);
        assert_eq!(c.capacity, 2048);
        assert_eq!(c.num_queues, 3);
        assert_eq!(c.discard_sector_alignment, 8);
    }

    #[test]
    fn a_grown_device_reaches_the_config_space_and_the_frontend() {
        use std::io::Read;
        let capacity = |b: &BlkBackend| u64::from_le_bytes(b.get_config(0, 8).try_into().expect("8 bytes"));
        let device = |size| -> Arc<dyn BlockDevice> { Arc::new(MemoryDevice::new(size)) };
        let shared = Arc::new(SharedDevice::new(device(1 << 20)));
        let backend = BlkBackend::new(
            &shared,
            &VhostUserBlkOptions::default(),
            GuestMemoryAtomic::new(GuestMem::new()),
        );
        assert!(backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::BACKEND_REQ));
        assert_eq!(capacity(&backend), 2048);
        // No back-end channel yet: the config space grows, nobody is told.
        shared.replace(device(4 << 20));
        assert!(!backend.tell_frontend().expect("tell"));
        assert_eq!(capacity(&backend), 8192);

        let (ours, mut frontend) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        backend.set_backend_req_fd(FrontendChannel::from_stream(ours));
        shared.replace(device(8 << 20));
        assert!(backend.tell_frontend().expect("tell"));
        assert_eq!(capacity(&backend), 16384);
        // What the frontend receives: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2), version 1
        // in the flags, no body.
        let mut header = [0u8; 12];
        frontend
            .read_exact(&mut header)
            .expect("a message on the back-end channel");
        let word = |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        assert_eq!((word(0), word(1) & 0x3, word(2)), (2, 1, 0), "{header:?}");

        // A frontend that went away: the device still grows, the error says why.
        drop(frontend);
        shared.replace(device(16 << 20));
        let err = backend.tell_frontend().expect_err("nobody to tell");
        assert!(err.to_string().contains("new capacity"), "{err}");
        assert_eq!(capacity(&backend), 32768);
    }

    #[test]
    fn options_are_validated() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4096));
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s");
        for bad in [
            VhostUserBlkOptions {
                num_queues: 0,
                ..Default::default()
            },
            VhostUserBlkOptions {
                num_queues: 65,
                ..Default::default()
            },
            VhostUserBlkOptions {
                block_size: 1000,
                ..Default::default()
            },
            VhostUserBlkOptions {
                seg_max: 0,
                ..Default::default()
            },
        ] {
            let err = VhostUserBlkExport::start(&sock, dev.clone(), bad).expect_err("invalid options");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn start_refuses_to_replace_a_regular_file_and_replaces_a_stale_socket() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4096));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.raw");
        std::fs::write(&file, b"precious").expect("write");
        let err = VhostUserBlkExport::start(&file, dev.clone(), Default::default()).expect_err("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).expect("read"), b"precious");

        let sock = dir.path().join("blk.sock");
        let stale = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        drop(stale); // leaves the socket file behind
        let export = VhostUserBlkExport::start(&sock, dev, Default::default()).expect("start");
        assert!(!export.is_connected());
        export.stop().expect("stop");
        assert!(!sock.exists(), "stop removes the socket");
    }

    /// A client that connects and hangs up without a word (a frontend killed at once)
    /// must not end the export: the next one is accepted.
    #[test]
    fn keeps_accepting_after_a_frontend_hangs_up() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4096));
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("blk.sock");
        let export = VhostUserBlkExport::start(&sock, dev, Default::default()).expect("start");
        for round in 1..=3 {
            let c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
            wait_for(|| export.connections() == round, "connection counted");
            drop(c);
            wait_for(|| !export.is_connected(), "disconnect noticed");
        }
        export.stop().expect("stop");
    }

    /// stop() ends a live connection too.
    #[test]
    fn stop_ends_a_connected_frontend() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4096));
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("blk.sock");
        let export = VhostUserBlkExport::start(&sock, dev, Default::default()).expect("start");
        let c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        wait_for(|| export.is_connected(), "connected");
        export.stop().expect("stop");
        drop(c);
        assert!(!sock.exists());
    }

    fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
