//! The lifecycle of one VM as a management front end drives it: configure,
//! start, pause, resume, stop, query. [`VmController`] is what a command
//! line, a config file and an HTTP API are thin adapters over.
//!
//! Two kinds of thread meet here. Any thread (an API thread, a signal
//! handler's relay, a library user) may configure, ask for the start, pause,
//! resume, stop or read the state. One *owner* thread builds and starts the
//! VM ([`VmController::serve_start`] or [`VmController::launch`]), because
//! building opens files, creates the VM and maps memory, which the other
//! threads' seccomp filters need not allow; it then waits for the VM's end
//! ([`VmController::finish`]).
//!
//! ```no_run
//! use vmm_core::{HostIo, KernelSource, LifecycleState, VmConfig, VmController};
//!
//! let controller = VmController::new(VmConfig::default());
//! controller.configure(|c| {
//!     c.kernel = KernelSource::Path("vmlinux".into());
//!     c.vcpus = 2;
//! })?;
//! // An API thread holds a clone and asks for the start ...
//! let api = controller.clone();
//! std::thread::spawn(move || api.start());
//! // ... which this thread, the owner, carries out.
//! let running = controller.serve_start(HostIo::default, |_builder| {})?;
//! assert_eq!(controller.state(), LifecycleState::Running);
//! let exit = controller.finish(running)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::builder::VmBuilder;
use crate::config::{HostIo, KernelSource, VmConfig};
use crate::vmm::{ControlError, RunningVm, VmHandle, VmmError};
use crate::VmExit;

/// Largest guest RAM a configuration may ask for, in MiB (the address
/// map's own limit is checked again when the VM is built).
pub const MAX_MEM_MIB: u64 = 16 * 1024 * 1024;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleState {
    /// Being configured; not built yet.
    NotStarted,
    /// Started and running.
    Running,
    /// Started and paused.
    Paused,
    /// Ended (the guest stopped, or a stop was asked for).
    Ended,
}

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A pre-boot operation after the start.
    #[error("the requested operation is not supported after starting the VM")]
    AfterStart,
    /// A post-boot operation before the start.
    #[error("the requested operation is not supported before starting the VM")]
    BeforeStart,
    /// The VM has ended.
    #[error("the VM has ended")]
    Ended,
    /// The configuration is not one a VM can be built from.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be built or started.
    #[error("cannot start the VM")]
    Start(#[source] VmmError),
    /// A pause or resume did not happen.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// No owner thread serves start requests any more.
    #[error("the thread that starts the VM is gone")]
    NoOwner,
    /// A snapshot could not be taken.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// What is wrong with a configuration, found before anything is built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No kernel was given.
    #[error("no kernel is configured")]
    NoKernel,
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than xAPIC IDs allow.
    #[error(
        "{0} vCPUs requested; at most 254 are supported (8-bit xAPIC IDs, one kept for the IOAPIC)"
    )]
    TooManyVcpus(u8),
    /// Guest RAM is zero or too large.
    #[error("{0} MiB of guest RAM: it must be 1-{MAX_MEM_MIB} MiB")]
    MemSize(u64),
    /// Huge pages need whole 2 MiB pages.
    #[error("{0} MiB of guest RAM on 2 MiB huge pages: it must be a multiple of 2")]
    HugePageMultiple(u64),
    /// The command line is too long or has a character it cannot hold.
    #[error(transparent)]
    Cmdline(#[from] vmm_boot::BootError),
    /// Two disks share a path and one of them is writable.
    #[error("{0} is given as a disk twice")]
    DuplicateDisk(String),
}

impl VmConfig {
    /// Checks what can be checked without touching the host: vCPU count,
    /// RAM size, command-line characters, the kernel being given, disks
    /// named twice. Building checks the rest (files, KVM).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > 254 {
            return Err(ConfigError::TooManyVcpus(self.vcpus));
        }
        if self.mem_mib == 0 || self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemSize(self.mem_mib));
        }
        if self.ram_backing == vmm_memory::RamBacking::HugePages && self.mem_mib % 2 != 0 {
            return Err(ConfigError::HugePageMultiple(self.mem_mib));
        }
        vmm_boot::check_cmdline(&self.cmdline)?;
        for (i, d) in self.disks.iter().enumerate() {
            let twice = self.disks[..i]
                .iter()
                .any(|e| e.path == d.path && !(e.read_only && d.read_only));
            if twice {
                return Err(ConfigError::DuplicateDisk(d.path.display().to_string()));
            }
        }
        // Last, so that an edit before the kernel is given is still checked.
        if self.restore.is_none() && matches!(self.kernel, KernelSource::Bytes(b) if b.is_empty()) {
            return Err(ConfigError::NoKernel);
        }
        Ok(())
    }
}

enum Phase {
    NotStarted,
    Running(VmHandle),
    Ended,
}

type Task = Box<dyn FnOnce() + Send>;

enum OwnerRequest {
    Start(SyncSender<Result<(), LifecycleError>>),
    Task(Task),
}

struct Inner {
    config: VmConfig,
    phase: Phase,
    metrics: Option<vmm_devices::metrics::MetricsRegistry>,
}

/// The lifecycle of one VM, shared by every thread that manages it (clones
/// share the VM). See the [module documentation](self).
#[derive(Clone)]
pub struct VmController {
    inner: Arc<Mutex<Inner>>,
    owner_thread: std::thread::ThreadId,
    requests: SyncSender<OwnerRequest>,
    owner: Arc<Mutex<Receiver<OwnerRequest>>>,
}

impl VmController {
    /// A VM to be configured, starting from `config`. The calling thread
    /// is the owner: the one that will build and start it.
    pub fn new(config: VmConfig) -> Self {
        let (requests, owner) = sync_channel(1);
        Self {
            owner_thread: std::thread::current().id(),
            inner: Arc::new(Mutex::new(Inner {
                config,
                phase: Phase::NotStarted,
                metrics: None,
            })),
            requests,
            owner: Arc::new(Mutex::new(owner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration: the one being edited before the start, the one
    /// the VM was built from after.
    pub fn config(&self) -> VmConfig {
        self.lock().config.clone()
    }

    /// The counters of the VM's devices, once it has started (and after
    /// it ended).
    pub fn metrics(&self) -> Option<vmm_devices::metrics::MetricsRegistry> {
        self.lock().metrics.clone()
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> LifecycleState {
        match &self.lock().phase {
            Phase::NotStarted => LifecycleState::NotStarted,
            Phase::Running(h) if h.is_paused() => LifecycleState::Paused,
            Phase::Running(_) => LifecycleState::Running,
            Phase::Ended => LifecycleState::Ended,
        }
    }

    /// Edits the configuration before the start. The edit applies to a
    /// copy; `edit` may refuse it by returning an error, and the result must
    /// pass the checks that need no kernel yet (a kernel is required only
    /// at the start), or nothing changes.
    pub fn try_configure<E>(
        &self,
        edit: impl FnOnce(&mut VmConfig) -> Result<(), E>,
    ) -> Result<Result<(), E>, LifecycleError> {
        let mut inner = self.lock();
        if !matches!(inner.phase, Phase::NotStarted) {
            return Err(LifecycleError::AfterStart);
        }
        let mut next = inner.config.clone();
        if let Err(e) = edit(&mut next) {
            return Ok(Err(e));
        }
        match next.validate() {
            Ok(()) | Err(ConfigError::NoKernel) => {}
            Err(e) => return Err(e.into()),
        }
        inner.config = next;
        Ok(Ok(()))
    }

    /// Edits the configuration before the start (see
    /// [`try_configure`](Self::try_configure)).
    pub fn configure(&self, edit: impl FnOnce(&mut VmConfig)) -> Result<(), LifecycleError> {
        self.try_configure::<std::convert::Infallible>(|c| {
            edit(c);
            Ok(())
        })
        .map(|_| ())
    }

    /// Asks the owner thread to build and start the VM and waits for the
    /// outcome.
    pub fn start(&self) -> Result<(), LifecycleError> {
        self.pre_boot()?;
        let (tx, rx) = sync_channel(1);
        self.requests
            .send(OwnerRequest::Start(tx))
            .map_err(|_| LifecycleError::NoOwner)?;
        rx.recv().map_err(|_| LifecycleError::NoOwner)?
    }

    /// Runs `task` on the owner thread (for work whose system calls only
    /// the owner's filter allows, such as opening a file) and returns its
    /// result: before the start while it serves start requests, after it
    /// while it waits for the VM ([`VmEvent::Run`](crate::VmEvent::Run));
    /// on the owner thread itself, at once.
    pub fn on_owner<R: Send + 'static>(
        &self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, LifecycleError> {
        let running = match &self.lock().phase {
            Phase::NotStarted => None,
            Phase::Running(h) => Some(h.events()),
            Phase::Ended => return Err(LifecycleError::Ended),
        };
        if std::thread::current().id() == self.owner_thread {
            return Ok(task());
        }
        let (tx, rx) = sync_channel(1);
        let task: Task = Box::new(move || {
            let _ = tx.send(task());
        });
        match running {
            None => self
                .requests
                .send(OwnerRequest::Task(task))
                .map_err(|_| LifecycleError::NoOwner)?,
            Some(events) => events.send(crate::VmEvent::Run(crate::events::OwnerTask(task))),
        }
        rx.recv().map_err(|_| LifecycleError::NoOwner)
    }

    /// Puts the running VM's disk `id` on the image at `path`, on the owner
    /// thread (see [`VmHandle::replace_disk`]).
    pub fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), LifecycleError> {
        let handle = self.handle()?;
        let (id, path) = (id.to_string(), path.to_path_buf());
        self.on_owner(move || handle.replace_disk(&id, &path))??;
        Ok(())
    }

    /// Replaces the running VM's disk `id`'s limits, on the owner thread
    /// (see [`VmHandle::update_disk_rate_limiter`]).
    pub fn update_disk_rate_limiter(
        &self,
        id: &str,
        limits: &vmm_devices::rate_limiter::RateLimiterConfig,
    ) -> Result<(), LifecycleError> {
        // On the owner thread, whose filter lets it re-arm the limiter's
        // timer.
        let handle = self.handle()?;
        let (id, limits) = (id.to_string(), *limits);
        self.on_owner(move || handle.update_disk_rate_limiter(&id, &limits))??;
        Ok(())
    }

    /// Replaces the running VM's NIC `id`'s limits, on the owner thread (see
    /// [`VmHandle::update_net_rate_limiters`]).
    pub fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&vmm_devices::rate_limiter::RateLimiterConfig>,
        tx: Option<&vmm_devices::rate_limiter::RateLimiterConfig>,
    ) -> Result<(), LifecycleError> {
        // On the owner thread, whose filter lets it re-arm the limiters'
        // timers.
        let handle = self.handle()?;
        let (id, rx, tx) = (id.to_string(), rx.copied(), tx.copied());
        self.on_owner(move || handle.update_net_rate_limiters(&id, rx.as_ref(), tx.as_ref()))??;
        Ok(())
    }

    /// On the owner thread: carries out [`on_owner`](Self::on_owner) tasks
    /// and [`start`](Self::start) requests until a start succeeds, and
    /// returns the running VM. `io` gives the consoles' host I/O for each
    /// attempt; `prepare` adds what the configuration does not say (signals,
    /// devices of the caller's own) to each attempt's builder.
    pub fn serve_start(
        &self,
        mut io: impl FnMut() -> HostIo,
        mut prepare: impl FnMut(&mut VmBuilder),
    ) -> Result<RunningVm, LifecycleError> {
        let owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match owner.recv().map_err(|_| LifecycleError::NoOwner)? {
                OwnerRequest::Task(task) => task(),
                OwnerRequest::Start(reply) => match self.launch(io(), &mut prepare) {
                    Ok(running) => {
                        let _ = reply.send(Ok(()));
                        return Ok(running);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
            }
        }
    }

    /// On the owner thread: builds and starts the VM now, from the current
    /// configuration.
    pub fn launch(
        &self,
        io: HostIo,
        prepare: impl FnOnce(&mut VmBuilder),
    ) -> Result<RunningVm, LifecycleError> {
        let config = {
            let inner = self.lock();
            match inner.phase {
                Phase::NotStarted => inner.config.clone(),
                Phase::Running(_) => return Err(LifecycleError::AfterStart),
                Phase::Ended => return Err(LifecycleError::Ended),
            }
        };
        config.validate()?;
        let mut builder = VmBuilder::from_config(&config, io).map_err(LifecycleError::Start)?;
        prepare(&mut builder);
        let vmm = builder.build().map_err(LifecycleError::Start)?;
        let handle = vmm.handle();
        let running = vmm.start().map_err(LifecycleError::Start)?;
        let mut inner = self.lock();
        if let (Some(_), Some(m)) = (&inner.config.restore, handle.machine()) {
            // A restored VM is the snapshot's machine: say so.
            let c = &mut inner.config;
            c.vcpus = m.vcpus;
            c.mem_mib = m.mem_mib;
            c.cmdline = m.cmdline;
            c.exit_port = m.exit_port;
            c.debugcon = m.debugcon;
            c.disks = m.disks.iter().map(|d| d.config(d.path.clone())).collect();
            c.rng = m.rng;
        }
        inner.metrics = Some(handle.metrics());
        inner.phase = Phase::Running(handle);
        Ok(running)
    }

    /// On the owner thread: waits for the VM's end (an orderly stop: see
    /// [`RunningVm::wait`]); the state is then [`LifecycleState::Ended`].
    pub fn finish(&self, running: RunningVm) -> Result<VmExit, VmmError> {
        let exit = running.wait();
        self.lock().phase = Phase::Ended;
        exit
    }

    fn pre_boot(&self) -> Result<(), LifecycleError> {
        match self.lock().phase {
            Phase::NotStarted => Ok(()),
            Phase::Running(_) => Err(LifecycleError::AfterStart),
            Phase::Ended => Err(LifecycleError::Ended),
        }
    }

    /// The running VM's handle, or why there is none.
    pub fn handle(&self) -> Result<VmHandle, LifecycleError> {
        match &self.lock().phase {
            Phase::NotStarted => Err(LifecycleError::BeforeStart),
            Phase::Running(h) => Ok(h.clone()),
            Phase::Ended => Err(LifecycleError::Ended),
        }
    }

    /// Pauses the running VM (see [`VmHandle::pause`]).
    pub fn pause(&self) -> Result<(), LifecycleError> {
        Ok(self.handle()?.pause()?)
    }

    /// Resumes the paused VM (see [`VmHandle::resume`]).
    pub fn resume(&self) -> Result<(), LifecycleError> {
        Ok(self.handle()?.resume()?)
    }

    /// Saves the paused VM to a state and a memory file, on the owner
    /// thread (see [`VmHandle::snapshot`]).
    pub fn snapshot(
        &self,
        req: crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotInfo, LifecycleError> {
        let handle = self.handle()?;
        Ok(self.on_owner(move || handle.snapshot(&req))??)
    }

    /// Presses Ctrl-Alt-Del on the running guest's keyboard (see
    /// [`VmHandle::send_ctrl_alt_del`]).
    pub fn send_ctrl_alt_del(&self) -> Result<(), LifecycleError> {
        Ok(self.handle()?.send_ctrl_alt_del()?)
    }

    /// Asks the running VM to stop in order (see [`VmHandle::stop`]).
    pub fn stop(&self) -> Result<(), LifecycleError> {
        self.handle()?.stop();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked_and_all_or_nothing() {
        let c = VmController::new(VmConfig::default());
        assert!(matches!(
            c.configure(|c| c.vcpus = 0),
            Err(LifecycleError::Config(ConfigError::NoVcpus))
        ));
        assert!(matches!(
            c.configure(|c| {
                c.mem_mib = 256;
                c.cmdline = "console=ttyS0\n".into();
            }),
            Err(LifecycleError::Config(ConfigError::Cmdline(_)))
        ));
        assert_eq!(c.config().mem_mib, 128, "a refused edit changes nothing");
        c.configure(|c| c.vcpus = 4).unwrap();
        assert_eq!(c.config().vcpus, 4);
        let refused: Result<(), &str> = c.try_configure(|_| Err("no")).unwrap();
        assert_eq!(refused, Err("no"));
    }

    #[test]
    fn post_boot_operations_are_refused_before_the_start() {
        let c = VmController::new(VmConfig::default());
        assert_eq!(c.state(), LifecycleState::NotStarted);
        assert!(matches!(c.pause(), Err(LifecycleError::BeforeStart)));
        assert!(matches!(c.resume(), Err(LifecycleError::BeforeStart)));
        assert!(matches!(c.stop(), Err(LifecycleError::BeforeStart)));
    }

    #[test]
    fn a_start_without_a_kernel_is_refused_by_the_owner() {
        let c = VmController::new(VmConfig::default());
        let asker = c.clone();
        let t = std::thread::spawn(move || asker.start());
        let owner = c.clone();
        // The serving thread outlives the test's checks; it is left blocked.
        let served = std::thread::spawn(move || owner.serve_start(HostIo::default, |_| {}));
        let outcome = t.join().unwrap();
        assert!(matches!(
            outcome,
            Err(LifecycleError::Config(ConfigError::NoKernel))
        ));
        assert_eq!(c.state(), LifecycleState::NotStarted);
        // A task asked for by another thread runs on the serving thread; on
        // the owner's own thread, at once.
        let asker = c.clone();
        let (ran_on, asked_from) = std::thread::spawn(move || {
            let ran_on = asker.on_owner(|| std::thread::current().id()).unwrap();
            (ran_on, std::thread::current().id())
        })
        .join()
        .unwrap();
        assert_eq!(ran_on, served.thread().id());
        assert_ne!(ran_on, asked_from);
        let here = std::thread::current().id();
        assert_eq!(
            c.on_owner(move || std::thread::current().id()).unwrap(),
            here
        );
        drop(served);
    }
}
