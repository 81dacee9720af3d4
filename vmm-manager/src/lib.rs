//! vmm-manager: runs VMs as Cloud Hypervisor or QEMU processes, supervises them,
//! re-adopts them after a restart, and serves their serial consoles.
//!
//! - [`spec`]: the VM spec and status types
//! - [`hypervisor`]: the `Hypervisor` trait and its Cloud Hypervisor and QEMU drivers
//! - [`service`]: lifecycle, supervision and re-adoption
//! - [`console`]: serial console ring buffer, log and fan-out
//! - [`http`] and [`client`]: the Unix-socket API and its client

pub mod client;
pub mod console;
pub mod http;
pub mod hypervisor;
pub mod jail;
pub mod process;
pub mod service;
pub mod spec;
pub mod vm_dir;

pub use hypervisor::qemu::Accel;
pub use service::{VmService, VmmConfig};
pub use spec::{HypervisorKind, VmAction, VmInfo, VmSpec, VmState};
