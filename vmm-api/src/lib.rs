//! Firecracker's REST API, the subset orchestrators use to boot and manage a
//! VM, served over a Unix socket as a thin adapter over
//! [`vmm_core::VmController`]; also its `--config-file` shape, its metrics
//! and its logger.
//!
//! Three layers, each usable alone:
//! - [`request::parse_request`]: method, path and body to a typed
//!   [`ApiRequest`], pure;
//! - [`Api`]: the resources (`/machine-config`, `/boot-source`, `/drives`,
//!   ...) applied to a [`VmController`](vmm_core::VmController), with Firecracker's pre-boot and
//!   post-boot rules and `fault_message` errors;
//! - [`ApiServer`]: HTTP/1.1 on a Unix socket, one thread, bounded and
//!   non-blocking, with its own seccomp filter ([`spawn`]).
//!
//! ```no_run
//! use vmm_api::{spawn, Api, ApiServer};
//! use vmm_core::{HostIo, VmConfig, VmController};
//!
//! let controller = VmController::new(VmConfig::default());
//! let server = ApiServer::bind("/tmp/vmm.sock".as_ref())?;
//! spawn(server, Api::new(controller.clone(), "vm0"), true)?;
//! // This thread builds the VM when a client sends InstanceStart.
//! let running = controller.serve_start(HostIo::default, |_| {})?;
//! let exit = controller.finish(running)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod api;
pub mod logger;
pub mod metrics;
pub mod model;
pub mod request;
pub mod server;

pub use api::{Api, ApiResponse, MetricsFlusher, APP_NAME, VERSION};
pub use request::{parse_request, ApiError, ApiRequest};
pub use server::{ApiServer, ServerError};

use vmm_core::seccomp::{program_with, spawn_confined, SpawnError, ThreadKind};

/// SIGINT, SIGTERM and SIGHUP blocked on this thread for as long as this
/// lives.
struct BlockedStopSignals(libc::sigset_t);

impl BlockedStopSignals {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data that sigemptyset initialises;
        // pthread_sigmask reads `set` and writes `old`, both live locals.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            Self(old)
        }
    }
}

impl Drop for BlockedStopSignals {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Why the API thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiThreadError {
    /// Its seccomp filter could not be built.
    #[error("cannot build the API thread's seccomp filter")]
    Filter(#[from] vmm_core::seccomp::SeccompError),
    /// The thread could not start.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// Starts the API thread serving `api` on `server`; with `confine`, under
/// its own seccomp filter (the calls every VMM thread may make, plus
/// accepting and polling sockets). The thread blocks SIGINT, SIGTERM and
/// SIGHUP, so that the process's handlers for them run elsewhere, under a
/// filter that allows what they do.
pub fn spawn(server: ApiServer, api: Api, confine: bool) -> Result<(), ApiThreadError> {
    // The thread inherits the signal mask of the thread that creates it.
    let _blocked = BlockedStopSignals::new();
    let filter = if confine {
        Some(program_with(
            ThreadKind::Input,
            server::API_SYSCALLS,
            server::API_IOCTLS,
        )?)
    } else {
        None
    };
    spawn_confined("vmm-api".into(), filter, move || server.serve(api))?;
    Ok(())
}
