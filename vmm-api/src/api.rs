//! [`Api`]: Firecracker's resources on [`VmController`]. It keeps the
//! resources as the client sent them (what `GET /vm/config` returns) and
//! applies each change to the controller's [`VmConfig`], so a refused
//! change leaves both as they were.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use vmm_core::snapshot::{RestoreConfig, SnapshotKind, SnapshotRequest};
use vmm_core::{
    DiskConfig, KernelSource, LifecycleError, LifecycleState, NetConfig, TapSource, VmConfig,
    VmController, VsockConfig,
};
use vmm_devices::virtio::net::{MacAddr, Tap};
use vmm_memory::RamBacking;

use crate::logger::ApiLogger;
use crate::metrics::{ApiCounters, MetricsSink};
use crate::model::*;
use crate::request::{ApiError, ApiRequest};

/// What a request answered: a JSON body (200) or nothing (204).
pub type ApiResponse = Result<Option<Value>, ApiError>;

/// The application name `GET /` reports.
pub const APP_NAME: &str = "vmm-kit";

/// This VMM's version, as `GET /version` and `GET /` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let msg = match &e {
            LifecycleError::AfterStart => {
                "The requested operation is not supported after starting the microVM.".to_string()
            }
            LifecycleError::BeforeStart => {
                "The requested operation is not supported before starting the microVM.".to_string()
            }
            other => {
                let mut m = other.to_string();
                let mut src = std::error::Error::source(other);
                while let Some(s) = src {
                    m.push_str(&format!(": {s}"));
                    src = s.source();
                }
                m
            }
        };
        ApiError::Lifecycle(msg)
    }
}

/// Writes metrics lines (see [`Api::metrics`]).
#[derive(Clone)]
pub struct MetricsFlusher {
    sink: MetricsSink,
    counters: Arc<ApiCounters>,
    controller: VmController,
}

impl MetricsFlusher {
    /// Whether a destination is set.
    pub fn is_initialized(&self) -> bool {
        self.sink.is_initialized()
    }

    /// Writes one line: the devices' counters (once the VM runs) and the
    /// API's.
    pub fn flush(&self) -> Result<(), crate::metrics::MetricsError> {
        self.sink
            .flush(self.controller.metrics().as_ref(), &self.counters)
    }
}

/// Firecracker's resources over a VM's lifecycle.
pub struct Api {
    controller: VmController,
    id: String,
    view: FullVmConfiguration,
    boot_source_set: bool,
    /// The disks the controller had before any `PUT /drives`.
    base_disks: Vec<DiskConfig>,
    /// The NICs the controller had before any `PUT /network-interfaces`.
    base_nets: Vec<NetConfig>,
    counters: Arc<ApiCounters>,
    metrics: MetricsSink,
    /// A boot resource (machine, boot source, drive, entropy) was set
    /// through the API: a snapshot can no longer be loaded.
    boot_configured: bool,
}

fn unsupported_limiter(what: &str, limiter: &Option<Value>) -> Result<(), ApiError> {
    match limiter {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(ApiError::NotSupported(format!("a rate limiter on {what}"))),
    }
}

/// Opens a log or metrics destination for appending, creating a file if
/// there is none; a named pipe is opened without blocking for a reader.
fn open_sink(path: &str) -> Result<File, ApiError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ApiError::Invalid(format!("cannot open {path}: {e}")))
}

/// Checks that `path` names a file (or block device, for drives) this
/// process can see.
fn check_file(what: &str, path: &str, block_ok: bool) -> Result<(), ApiError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ApiError::Invalid(format!("cannot use {path} as the {what}: {e}")))?;
    let ft = meta.file_type();
    if ft.is_file() || (block_ok && ft.is_block_device()) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "cannot use {path} as the {what}: not a regular file"
        )))
    }
}

impl Api {
    /// The API of the VM `controller` manages, for instance `id`. The
    /// machine configuration starts from the controller's.
    pub fn new(controller: VmController, id: impl Into<String>) -> Self {
        let config = controller.config();
        let view = FullVmConfiguration {
            machine_config: Some(MachineConfig {
                vcpu_count: config.vcpus.into(),
                mem_size_mib: config.mem_mib,
                huge_pages: match config.ram_backing {
                    RamBacking::HugePages => HugePages::Hugetlbfs2M,
                    _ => HugePages::None,
                },
                ..MachineConfig::default()
            }),
            ..FullVmConfiguration::default()
        };
        let boot_source_set = !matches!(config.kernel, KernelSource::Bytes(b) if b.is_empty());
        Self {
            controller,
            id: id.into(),
            view,
            boot_source_set,
            base_disks: config.disks.clone(),
            base_nets: config.nets.clone(),
            counters: Arc::default(),
            metrics: MetricsSink::default(),
            boot_configured: false,
        }
    }

    /// The controller this API drives.
    pub fn controller(&self) -> &VmController {
        &self.controller
    }

    /// What writes this API's metrics: the devices' and the API's
    /// counters to the configured destination. Keep one to write the last
    /// line at the end of a run, after the API thread is gone.
    pub fn metrics(&self) -> MetricsFlusher {
        MetricsFlusher {
            sink: self.metrics.clone(),
            counters: self.counters.clone(),
            controller: self.controller.clone(),
        }
    }

    /// Writes a metrics line now, if a destination is set.
    pub fn flush_metrics(&self) -> Result<(), crate::metrics::MetricsError> {
        self.metrics().flush()
    }

    /// Applies a whole configuration (the config file's), as the matching
    /// `PUT` requests would, in Firecracker's order.
    pub fn apply(&mut self, config: FullVmConfiguration) -> Result<(), ApiError> {
        for (name, present) in [
            ("balloon", config.balloon.is_some()),
            ("mmds-config", config.mmds_config.is_some()),
            ("cpu-config", config.cpu_config.is_some()),
            ("memory-hotplug", config.memory_hotplug.is_some()),
            ("pmem", !config.pmem.is_empty()),
        ] {
            if present {
                return Err(ApiError::NotSupported(name.into()));
            }
        }
        if let Some(l) = config.logger {
            self.put_logger(l)?;
        }
        if let Some(m) = config.metrics {
            self.put_metrics(m)?;
        }
        if let Some(m) = config.machine_config {
            self.put_machine(m)?;
        }
        if let Some(b) = config.boot_source {
            self.put_boot_source(b)?;
        }
        for d in config.drives {
            self.put_drive(d)?;
        }
        for n in config.network_interfaces {
            self.put_net(n)?;
        }
        if let Some(v) = config.vsock {
            self.put_vsock(v)?;
        }
        if let Some(e) = config.entropy {
            self.put_entropy(e)?;
        }
        Ok(())
    }

    /// Handles one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        let (group, name) = metric_name(&request);
        let out = self.dispatch(request);
        self.counters.count(group, name);
        if out.is_err() && group != "get_api_requests" {
            self.counters.count(group, fail_name(name));
        }
        out
    }

    fn dispatch(&mut self, request: ApiRequest) -> ApiResponse {
        let boot_resource = matches!(
            request,
            ApiRequest::PutMachineConfig(_)
                | ApiRequest::PatchMachineConfig(_)
                | ApiRequest::PutBootSource(_)
                | ApiRequest::PutDrive(_)
                | ApiRequest::PutNetworkInterface(_)
                | ApiRequest::PutVsock(_)
                | ApiRequest::PutEntropy(_)
        );
        let out = self.dispatch_inner(request);
        if boot_resource && out.is_ok() {
            self.boot_configured = true;
        }
        out
    }

    fn dispatch_inner(&mut self, request: ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::GetInstanceInfo => Ok(Some(serde_json::to_value(InstanceInfo {
                app_name: APP_NAME.into(),
                id: self.id.clone(),
                state: match self.controller.state() {
                    LifecycleState::NotStarted => "Not started",
                    LifecycleState::Running => "Running",
                    LifecycleState::Paused | LifecycleState::Ended => "Paused",
                }
                .into(),
                vmm_version: VERSION.into(),
            })?)),
            ApiRequest::GetVersion => Ok(Some(serde_json::to_value(VersionInfo {
                firecracker_version: VERSION.into(),
            })?)),
            ApiRequest::GetMachineConfig => Ok(Some(serde_json::to_value(
                self.view.machine_config.clone().unwrap_or_default(),
            )?)),
            ApiRequest::PutMachineConfig(m) => self.put_machine(m).map(|_| None),
            ApiRequest::PatchMachineConfig(u) => {
                let mut m = self.view.machine_config.clone().unwrap_or_default();
                if let Some(v) = u.vcpu_count {
                    m.vcpu_count = v;
                }
                if let Some(v) = u.mem_size_mib {
                    m.mem_size_mib = v;
                }
                if let Some(v) = u.smt {
                    m.smt = v;
                }
                if let Some(v) = u.cpu_template {
                    m.cpu_template = Some(v);
                }
                if let Some(v) = u.track_dirty_pages {
                    m.track_dirty_pages = v;
                }
                if let Some(v) = u.huge_pages {
                    m.huge_pages = v;
                }
                self.put_machine(m).map(|_| None)
            }
            ApiRequest::PutBootSource(b) => self.put_boot_source(b).map(|_| None),
            ApiRequest::PutDrive(d) => self.put_drive(d).map(|_| None),
            ApiRequest::PatchDrive(d) => self.patch_drive(d).map(|_| None),
            ApiRequest::PutEntropy(e) => self.put_entropy(e).map(|_| None),
            ApiRequest::PutNetworkInterface(n) => self.put_net(n).map(|_| None),
            ApiRequest::PatchNetworkInterface(n) => self.patch_net(n).map(|_| None),
            ApiRequest::PutVsock(v) => self.put_vsock(v).map(|_| None),
            ApiRequest::Action(ActionType::InstanceStart) => {
                if !self.boot_source_set && self.controller.state() == LifecycleState::NotStarted {
                    return Err(ApiError::Invalid(
                        "Cannot start microvm without kernel configuration (PUT /boot-source first)."
                            .into(),
                    ));
                }
                self.controller.start()?;
                Ok(None)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.controller.send_ctrl_alt_del()?;
                Ok(None)
            }
            ApiRequest::Action(ActionType::InstanceStop) => {
                self.controller.stop()?;
                Ok(None)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                self.flush_metrics()
                    .map_err(|e| ApiError::Invalid(e.to_string()))?;
                Ok(None)
            }
            ApiRequest::PatchVm(VmRunState::Paused) => {
                self.controller.pause()?;
                Ok(None)
            }
            ApiRequest::PatchVm(VmRunState::Resumed) => {
                self.controller.resume()?;
                Ok(None)
            }
            ApiRequest::GetVmConfig => Ok(Some(serde_json::to_value(&self.view)?)),
            ApiRequest::PutLogger(l) => self.put_logger(l).map(|_| None),
            ApiRequest::PutMetrics(m) => self.put_metrics(m).map(|_| None),
            ApiRequest::CreateSnapshot(c) => self.create_snapshot(c).map(|_| None),
            ApiRequest::LoadSnapshot(l) => self.load_snapshot(l).map(|_| None),
        }
    }

    /// `PUT /snapshot/create`: the paused VM to a state and a memory file.
    fn create_snapshot(&mut self, c: SnapshotCreateParams) -> Result<(), ApiError> {
        match self.controller.state() {
            LifecycleState::NotStarted => return Err(LifecycleError::BeforeStart.into()),
            LifecycleState::Running => {
                return Err(ApiError::Invalid(
                    "Cannot create a snapshot of a running microVM: pause it first (PATCH /vm {\"state\": \"Paused\"})."
                        .into(),
                ))
            }
            LifecycleState::Paused | LifecycleState::Ended => {}
        }
        let info = self.controller.snapshot(SnapshotRequest {
            state_path: PathBuf::from(&c.snapshot_path),
            memory_path: PathBuf::from(&c.mem_file_path),
            kind: match c.snapshot_type {
                SnapshotType::Full => SnapshotKind::Full,
                SnapshotType::Diff => SnapshotKind::Diff,
            },
        })?;
        log::info!(
            "snapshot {} ({:?}): {} bytes of memory in {:?}",
            c.snapshot_path,
            c.snapshot_type,
            info.memory_bytes,
            info.duration
        );
        Ok(())
    }

    /// `PUT /snapshot/load`: restores a snapshot in this fresh process,
    /// before anything but the logger and metrics was configured.
    fn load_snapshot(&mut self, l: SnapshotLoadParams) -> Result<(), ApiError> {
        self.pre_boot()?;
        if self.boot_configured {
            return Err(ApiError::Invalid(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                    .into(),
            ));
        }
        let memory = match (l.mem_file_path, l.mem_backend) {
            (Some(path), None) => path,
            (None, Some(b)) if b.backend_type == MemoryBackendType::File => b.backend_path,
            (None, Some(_)) => {
                return Err(ApiError::NotSupported("the Uffd memory backend".into()))
            }
            _ => {
                return Err(ApiError::Invalid(
                    "Exactly one of mem_file_path and mem_backend must be given.".into(),
                ))
            }
        };
        let track = l
            .track_dirty_pages
            .or(l.enable_diff_snapshots)
            .unwrap_or(false);
        let restore = RestoreConfig {
            state_path: PathBuf::from(&l.snapshot_path),
            memory: vec![PathBuf::from(memory)],
            eager: false,
            disks: Vec::new(),
            nets: l
                .network_overrides
                .iter()
                .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                .collect(),
            vsock_uds: None,
            resume: l.resume_vm,
        };
        let before = self.controller.config();
        self.controller.configure(|c| {
            c.restore = Some(restore);
            c.track_dirty_pages = track;
        })?;
        if let Err(e) = self.controller.start() {
            let _ = self.controller.configure(|c| {
                c.restore = before.restore;
                c.track_dirty_pages = before.track_dirty_pages;
            });
            return Err(e.into());
        }
        // What GET /vm/config and GET /machine-config report from now on.
        let restored = self.controller.config();
        let mut view = self.view.clone();
        let machine = view
            .machine_config
            .get_or_insert_with(MachineConfig::default);
        machine.vcpu_count = restored.vcpus.into();
        machine.mem_size_mib = restored.mem_mib;
        machine.track_dirty_pages = track;
        self.view = view;
        Ok(())
    }

    /// Applies the current resources to the controller's configuration.
    fn commit(&mut self, view: FullVmConfiguration) -> Result<(), ApiError> {
        let (disks, nets) = (&self.base_disks, &self.base_nets);
        let edit = |c: &mut VmConfig| -> Result<(), ApiError> { apply_view(&view, disks, nets, c) };
        self.controller.try_configure(edit)??;
        self.view = view;
        Ok(())
    }

    fn pre_boot(&self) -> Result<(), ApiError> {
        match self.controller.state() {
            LifecycleState::NotStarted => Ok(()),
            _ => Err(LifecycleError::AfterStart.into()),
        }
    }

    fn put_machine(&mut self, m: MachineConfig) -> Result<(), ApiError> {
        self.pre_boot()?;
        if m.vcpu_count == 0 || m.vcpu_count > 254 {
            return Err(ApiError::Invalid(format!(
                "Invalid number of vcpus: {}: this VMM runs 1-254",
                m.vcpu_count
            )));
        }
        if m.smt {
            return Err(ApiError::NotSupported(
                "smt (simultaneous multithreading)".into(),
            ));
        }
        if matches!(m.cpu_template.as_deref(), Some(t) if t != "None") {
            return Err(ApiError::NotSupported(format!(
                "the CPU template {:?}",
                m.cpu_template.as_deref().unwrap_or("")
            )));
        }
        if m.huge_pages == HugePages::Transparent {
            return Err(ApiError::NotSupported("huge_pages Transparent".into()));
        }
        let mut view = self.view.clone();
        view.machine_config = Some(m);
        self.commit(view)
    }

    fn put_boot_source(&mut self, b: BootSource) -> Result<(), ApiError> {
        self.pre_boot()?;
        let kernel = b.kernel_image_path.clone();
        let initrd = b.initrd_path.clone();
        self.controller.on_owner(move || -> Result<(), ApiError> {
            check_file("kernel image", &kernel, false)?;
            if let Some(i) = &initrd {
                check_file("initrd", i, false)?;
            }
            Ok(())
        })??;
        let mut view = self.view.clone();
        view.boot_source = Some(b);
        self.commit(view)?;
        self.boot_source_set = true;
        Ok(())
    }

    fn put_drive(&mut self, d: Drive) -> Result<(), ApiError> {
        self.pre_boot()?;
        if d.socket.is_some() {
            return Err(ApiError::NotSupported("vhost-user-blk (socket)".into()));
        }
        if d.io_engine == IoEngine::Async {
            return Err(ApiError::NotSupported("io_engine Async".into()));
        }
        if let Some(l) = &d.rate_limiter {
            check_limiter(&effective(l))?;
        }
        let path = d
            .path_on_host
            .clone()
            .ok_or_else(|| ApiError::Invalid("a drive needs path_on_host".into()))?;
        self.controller
            .on_owner(move || check_file("drive", &path, true))??;
        let mut view = self.view.clone();
        if d.is_root_device {
            if let Some(other) = view
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != d.drive_id)
            {
                return Err(ApiError::Invalid(format!(
                    "A root block device already exists ({})!",
                    other.drive_id
                )));
            }
        }
        match view.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => view.drives.push(d),
        }
        // The root device is the first disk: /dev/vda.
        view.drives.sort_by_key(|d| !d.is_root_device);
        self.commit(view)
    }

    fn patch_drive(&mut self, d: PartialDrive) -> Result<(), ApiError> {
        self.controller.handle()?;
        if !self.view.drives.iter().any(|o| o.drive_id == d.drive_id) {
            return Err(ApiError::Invalid(format!(
                "Invalid block device ID: {}",
                d.drive_id
            )));
        }
        if let Some(update) = &d.rate_limiter {
            let old = self
                .view
                .drives
                .iter()
                .find(|o| o.drive_id == d.drive_id)
                .and_then(|o| o.rate_limiter.as_ref().map(effective));
            let limits = merge(old, update);
            check_limiter(&limits)?;
            self.controller
                .update_disk_rate_limiter(&d.drive_id, &limits)?;
            if let Some(drive) = self
                .view
                .drives
                .iter_mut()
                .find(|o| o.drive_id == d.drive_id)
            {
                drive.rate_limiter = Some(limits);
            }
        }
        if let Some(path) = &d.path_on_host {
            self.controller
                .replace_disk(&d.drive_id, std::path::Path::new(path))?;
            if let Some(drive) = self
                .view
                .drives
                .iter_mut()
                .find(|o| o.drive_id == d.drive_id)
            {
                drive.path_on_host = Some(path.clone());
            }
        }
        Ok(())
    }

    fn put_net(&mut self, n: NetworkInterface) -> Result<(), ApiError> {
        self.pre_boot()?;
        if let Some(mac) = &n.guest_mac {
            mac.parse::<MacAddr>()
                .map_err(|e| ApiError::Invalid(e.to_string()))?;
        }
        for l in [&n.rx_rate_limiter, &n.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            vmm_devices::rate_limiter::RateLimiter::check(&effective(l))
                .map_err(|e| ApiError::Invalid(format!("rate limiter: {e}")))?;
        }
        let others = || {
            self.view
                .network_interfaces
                .iter()
                .filter(|o| o.iface_id != n.iface_id)
        };
        if others().any(|o| o.host_dev_name == n.host_dev_name) {
            return Err(ApiError::Invalid(format!(
                "The host device name {} is already in use.",
                n.host_dev_name
            )));
        }
        if let Some(mac) = &n.guest_mac {
            let mac: MacAddr =
                mac.parse()
                    .map_err(|e: vmm_devices::virtio::net::MacAddrError| {
                        ApiError::Invalid(e.to_string())
                    })?;
            if others()
                .any(|o| o.guest_mac.as_ref().and_then(|m| m.parse::<MacAddr>().ok()) == Some(mac))
            {
                return Err(ApiError::Invalid(format!(
                    "The MAC address is already in use: {mac}"
                )));
            }
        }
        // Attach to the TAP once now, so that a missing, busy or forbidden
        // one is this request's error, not InstanceStart's.
        let name = n.host_dev_name.clone();
        self.controller.on_owner(move || {
            Tap::open(&name).map(drop).map_err(|e| {
                ApiError::Invalid(format!(
                    "Could not create the network device: {}",
                    error_chain(&e)
                ))
            })
        })??;
        let mut view = self.view.clone();
        match view
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => view.network_interfaces.push(n),
        }
        self.commit(view)
    }

    fn patch_net(&mut self, p: PartialNetworkInterface) -> Result<(), ApiError> {
        self.controller.handle()?;
        let Some(nic) = self
            .view
            .network_interfaces
            .iter()
            .find(|o| o.iface_id == p.iface_id)
            .cloned()
            .or_else(|| {
                self.base_nets
                    .iter()
                    .find(|b| b.id == p.iface_id)
                    .map(|b| NetworkInterface {
                        iface_id: b.id.clone(),
                        host_dev_name: String::new(),
                        guest_mac: None,
                        rx_rate_limiter: b.rx_rate_limiter,
                        tx_rate_limiter: b.tx_rate_limiter,
                    })
            })
        else {
            return Err(ApiError::Invalid(format!(
                "Invalid network interface ID: {}",
                p.iface_id
            )));
        };
        let rx = p.rx_rate_limiter.map(|u| merge(nic.rx_rate_limiter, &u));
        let tx = p.tx_rate_limiter.map(|u| merge(nic.tx_rate_limiter, &u));
        for l in [&rx, &tx].into_iter().flatten() {
            check_limiter(l)?;
        }
        self.controller
            .update_net_rate_limiters(&p.iface_id, rx.as_ref(), tx.as_ref())?;
        if let Some(v) = self
            .view
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == p.iface_id)
        {
            if rx.is_some() {
                v.rx_rate_limiter = rx;
            }
            if tx.is_some() {
                v.tx_rate_limiter = tx;
            }
        }
        Ok(())
    }

    fn put_vsock(&mut self, v: VsockDevice) -> Result<(), ApiError> {
        self.pre_boot()?;
        if !(3..=u64::from(u32::MAX - 1)).contains(&v.guest_cid) {
            return Err(ApiError::Invalid(format!(
                "Invalid guest CID {}: use 3 to 4294967294.",
                v.guest_cid
            )));
        }
        if v.uds_path.is_empty() {
            return Err(ApiError::Invalid("uds_path must not be empty.".into()));
        }
        let path = v.uds_path.clone();
        self.controller.on_owner(move || {
            vmm_devices::host_files::check_socket_path("vsock socket", Path::new(&path))
                .map(drop)
                .map_err(|e| {
                    ApiError::Invalid(format!("Cannot use {path} as the vsock socket: {e}."))
                })
        })??;
        let mut view = self.view.clone();
        view.vsock = Some(v);
        self.commit(view)
    }

    fn put_entropy(&mut self, e: EntropyDevice) -> Result<(), ApiError> {
        self.pre_boot()?;
        unsupported_limiter("the entropy device", &e.rate_limiter)?;
        let mut view = self.view.clone();
        view.entropy = Some(e);
        self.commit(view)
    }

    fn put_logger(&mut self, l: LoggerConfig) -> Result<(), ApiError> {
        self.pre_boot()?;
        let logger = ApiLogger::get().map_err(|e| ApiError::Internal(e.to_string()))?;
        let path = l.log_path.clone();
        let file = self.controller.on_owner(move || open_sink(&path))??;
        logger
            .configure(&l, file, &self.id)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        self.view.logger = Some(l);
        Ok(())
    }

    fn put_metrics(&mut self, m: MetricsConfig) -> Result<(), ApiError> {
        self.pre_boot()?;
        if self.metrics.is_initialized() {
            return Err(ApiError::Invalid(
                "Reinitialization of metrics not allowed.".into(),
            ));
        }
        let path = m.metrics_path.clone();
        let file = self.controller.on_owner(move || open_sink(&path))??;
        self.metrics
            .init(file)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        self.view.metrics = Some(m);
        Ok(())
    }
}

fn check_limiter(l: &RateLimiterConfig) -> Result<(), ApiError> {
    vmm_devices::rate_limiter::RateLimiter::check(l)
        .map_err(|e| ApiError::Invalid(format!("rate limiter: {e}")))
}

/// A limiter as Firecracker reads it: a bucket of size or refill time 0
/// limits nothing.
fn effective(c: &RateLimiterConfig) -> RateLimiterConfig {
    let keep = |b: Option<TokenBucketConfig>| b.filter(|b| b.size > 0 && b.refill_time > 0);
    RateLimiterConfig {
        bandwidth: keep(c.bandwidth),
        ops: keep(c.ops),
    }
}

/// `old` with the buckets `update` gives (as [`effective`] reads them).
fn merge(old: Option<RateLimiterConfig>, update: &RateLimiterConfig) -> RateLimiterConfig {
    let old = old.unwrap_or_default();
    let new = effective(update);
    RateLimiterConfig {
        bandwidth: if update.bandwidth.is_some() {
            new.bandwidth
        } else {
            old.bandwidth
        },
        ops: if update.ops.is_some() {
            new.ops
        } else {
            old.ops
        },
    }
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The controller's configuration as the resources describe it; what they
/// do not describe (consoles, seccomp, exit port) stays as it was.
fn apply_view(
    view: &FullVmConfiguration,
    base_disks: &[DiskConfig],
    base_nets: &[NetConfig],
    c: &mut VmConfig,
) -> Result<(), ApiError> {
    if let Some(m) = &view.machine_config {
        c.vcpus = u8::try_from(m.vcpu_count)
            .map_err(|_| ApiError::Invalid(format!("Invalid number of vcpus: {}", m.vcpu_count)))?;
        c.mem_mib = m.mem_size_mib;
        c.track_dirty_pages = m.track_dirty_pages;
        c.ram_backing = match m.huge_pages {
            HugePages::Hugetlbfs2M => RamBacking::HugePages,
            _ if c.ram_backing == RamBacking::HugePages => RamBacking::Anonymous,
            _ => c.ram_backing,
        };
    }
    let mut cmdline = None;
    if let Some(b) = &view.boot_source {
        c.kernel = KernelSource::Path(PathBuf::from(&b.kernel_image_path));
        c.initrd = b.initrd_path.as_ref().map(PathBuf::from);
        cmdline = Some(
            b.boot_args
                .clone()
                .unwrap_or_else(|| vmm_core::DEFAULT_CMDLINE.into()),
        );
    }
    // The API's drives first (the root device is /dev/vda), then the disks
    // the controller was created with.
    c.disks = view
        .drives
        .iter()
        .map(|d| DiskConfig {
            path: PathBuf::from(d.path_on_host.as_deref().unwrap_or_default()),
            read_only: d.is_read_only.unwrap_or(false),
            // The guest reads the first 20 bytes as the disk's id.
            serial: Some(d.drive_id.chars().take(20).collect()),
            name: Some(d.drive_id.clone()),
            lock: true,
            rate_limiter: d.rate_limiter.as_ref().map(effective),
        })
        .chain(base_disks.iter().cloned())
        .collect();
    if let Some(mut line) = cmdline {
        if let Some(root) = view.drives.iter().find(|d| d.is_root_device) {
            let dev = match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            line.push_str(&format!(" {dev} {mode}"));
        }
        c.cmdline = line;
    }
    c.nets = view
        .network_interfaces
        .iter()
        .map(|n| {
            Ok(NetConfig {
                id: n.iface_id.clone(),
                tap: TapSource::Name(n.host_dev_name.clone()),
                mac: n.guest_mac.as_deref().map(str::parse).transpose().map_err(
                    |e: vmm_devices::virtio::net::MacAddrError| ApiError::Invalid(e.to_string()),
                )?,
                rx_rate_limiter: n.rx_rate_limiter.as_ref().map(effective),
                tx_rate_limiter: n.tx_rate_limiter.as_ref().map(effective),
            })
        })
        .chain(base_nets.iter().cloned().map(Ok))
        .collect::<Result<_, ApiError>>()?;
    if let Some(v) = &view.vsock {
        c.vsock = Some(VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: PathBuf::from(&v.uds_path),
        });
    }
    c.rng = view.entropy.is_some() || c.rng;
    Ok(())
}

fn metric_name(r: &ApiRequest) -> (&'static str, &'static str) {
    match r {
        ApiRequest::GetInstanceInfo => ("get_api_requests", "instance_info_count"),
        ApiRequest::GetVersion => ("get_api_requests", "vmm_version_count"),
        ApiRequest::GetMachineConfig => ("get_api_requests", "machine_cfg_count"),
        ApiRequest::GetVmConfig => ("get_api_requests", "vm_config_count"),
        ApiRequest::PutMachineConfig(_) => ("put_api_requests", "machine_cfg_count"),
        ApiRequest::PatchMachineConfig(_) => ("patch_api_requests", "machine_cfg_count"),
        ApiRequest::PutBootSource(_) => ("put_api_requests", "boot_source_count"),
        ApiRequest::PutDrive(_) => ("put_api_requests", "drive_count"),
        ApiRequest::PatchDrive(_) => ("patch_api_requests", "drive_count"),
        ApiRequest::PutEntropy(_) => ("put_api_requests", "entropy_count"),
        ApiRequest::PutNetworkInterface(_) => ("put_api_requests", "network_count"),
        ApiRequest::PatchNetworkInterface(_) => ("patch_api_requests", "network_count"),
        ApiRequest::PutVsock(_) => ("put_api_requests", "vsock_count"),
        ApiRequest::Action(_) => ("put_api_requests", "actions_count"),
        ApiRequest::PatchVm(_) => ("patch_api_requests", "vm_count"),
        ApiRequest::PutLogger(_) => ("put_api_requests", "logger_count"),
        ApiRequest::PutMetrics(_) => ("put_api_requests", "metrics_count"),
        ApiRequest::CreateSnapshot(_) => ("put_api_requests", "snapshot_create_count"),
        ApiRequest::LoadSnapshot(_) => ("put_api_requests", "snapshot_load_count"),
    }
}

fn fail_name(count: &'static str) -> &'static str {
    match count {
        "machine_cfg_count" => "machine_cfg_fails",
        "boot_source_count" => "boot_source_fails",
        "drive_count" => "drive_fails",
        "entropy_count" => "entropy_fails",
        "actions_count" => "actions_fails",
        "vm_count" => "vm_fails",
        "logger_count" => "logger_fails",
        "metrics_count" => "metrics_fails",
        _ => "other_fails",
    }
}
