//! The bodies of Firecracker's API (its `firecracker.yaml`), as serde types.
//! Unknown fields are refused, as Firecracker refuses them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use vmm_devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// `GET /`: what this VMM is and where its VM is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The application's name.
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// This VMM's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version of this VMM (the field keeps Firecracker's name).
    pub firecracker_version: String,
}

/// Which huge pages back guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (refused: not offered by this VMM).
    Transparent,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` and `GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs (this VMM: 1-254).
    pub vcpu_count: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (only `false` is offered).
    #[serde(default)]
    pub smt: bool,
    /// A CPU template (only `None` is offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty-page tracking for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// What backs guest RAM.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u64>,
    /// Guest RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    pub smt: Option<bool>,
    /// A CPU template.
    pub cpu_template: Option<String>,
    /// Dirty-page tracking.
    pub track_dirty_pages: Option<bool>,
    /// What backs guest RAM.
    pub huge_pages: Option<HugePages>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: String,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// A drive's cache policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Firecracker's default: flushes are not offered to the guest. This VMM
    /// offers and honours them anyway (it never drops a guest's flush).
    #[default]
    Unsafe,
    /// Flushes offered and honoured.
    Writeback,
}

/// A drive's I/O engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O on the device thread.
    #[default]
    Sync,
    /// io_uring (refused: not offered yet).
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (also what the guest reads with GET_ID, up to 20 bytes).
    pub drive_id: String,
    /// Whether the guest boots from it (`root=` on the command line; it
    /// becomes the first disk).
    pub is_root_device: bool,
    /// The boot partition's UUID (`root=PARTUUID=`), for a root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: Option<bool>,
    /// The cache policy.
    #[serde(default)]
    pub cache_type: CacheType,
    /// The image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Limits on bytes and requests (a bucket of size or refill time 0
    /// limits nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// The I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// A vhost-user-blk socket (refused: not offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// A new image on the host.
    pub path_on_host: Option<String>,
    /// New limits: a bucket given replaces that bucket, one left out stays.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// The host TAP interface it is on.
    pub host_dev_name: String,
    /// The MAC address the guest is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`: new limits for a running VM's
/// interface. A bucket given replaces that bucket (one of size or refill
/// time 0 removes it); a bucket left out stays as it was.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to (`<uds_path>_<port>` for
    /// the guest's connections).
    pub uds_path: String,
    /// An id (deprecated in Firecracker; accepted and kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// A rate limiter (refused: not offered yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
}

/// The actions of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Build and start the VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's keyboard.
    SendCtrlAltDel,
    /// This VMM's own: stop the VM in order (vCPUs out, pending disk
    /// requests finished, disks flushed); the process then ends. Firecracker
    /// has no such action (it is stopped by a signal).
    InstanceStop,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// The states `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    /// Pause every vCPU and the devices.
    Paused,
    /// Run again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// The state wanted.
    pub state: VmRunState,
}

/// Log levels of `PUT /logger` (case-insensitive, as Firecracker's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Information too.
    Info,
    /// Debug messages too.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown log level {s:?}: expected Error, Warning, Info, Debug, Trace or Off"
                )))
            }
        })
    }
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// The file or named pipe the log goes to (created if missing).
    pub log_path: String,
    /// The level (default Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level.
    #[serde(default)]
    pub show_level: bool,
    /// Prefix each line with its source file and line.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Only messages from this module path (and below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The file or named pipe the metrics go to, one JSON object per line.
    pub metrics_path: String,
}

/// `GET /vm/config`, and the shape of `--config-file`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// The kernel, initrd and command line.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Every drive, the root device first.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and RAM.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// The metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDevice>,
    /// A balloon (not offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Value>,
    /// MMDS (not offered).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<Value>,
    /// CPU feature modifiers (not offered).
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<Value>,
    /// Memory hot-plug (not offered).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<Value>,
    /// pmem devices (not offered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<Value>,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// The pages written since the last snapshot (needs
    /// `track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where the guest memory goes.
    pub mem_file_path: String,
    /// Where the VM state goes.
    pub snapshot_path: String,
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `mem_backend.backend_type` of `PUT /snapshot/load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Guest memory mapped from a file.
    File,
    /// Guest memory served by a userfaultfd handler (not offered).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file (or the handler's socket, for Uffd).
    pub backend_path: String,
}

/// `network_overrides` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new host device.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The VM state file.
    pub snapshot_path: String,
    /// The memory file (deprecated by Firecracker; exactly one of this and
    /// `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Where guest memory comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages, for diff snapshots of the restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the VM once loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// New host devices for network interfaces (no interface is offered
    /// yet: only an empty list is accepted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// Firecracker's error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub fault_message: String,
}
