//! Seccomp filters for the VMM's threads, built with seccompiler.
//!
//! Each thread that runs guest-driven code installs, before it touches the
//! guest, a filter that allows only the system calls its job needs; any other
//! system call raises `SIGSYS`, whose handler names the call on stderr and
//! ends the process with status 159 (128 + SIGSYS).
//!
//! | thread | allowed beyond the common set |
//! |---|---|
//! | vCPU | `ioctl` with `KVM_RUN`, `KVM_GET_REGS`, `KVM_GET_SREGS`, `KVM_TRANSLATE` and the reads of [`VCPU_SAVE_IOCTLS`] only |
//! | event loop | `epoll_wait`/`epoll_pwait`/`epoll_ctl`, `pread64`/`pwrite64`, `lseek`, `fdatasync`/`fsync`, `fallocate`, `getrandom` |
//! | input (host stdin pumps, output pumps) | nothing |
//! | main (after the VM is built) | `tgkill` (to kick vCPUs), `fdatasync`/`fsync` (to flush disks when the VM stops), the reads of [`VM_SAVE_IOCTLS`] |
//!
//! Every thread may also `ioctl(TCSETS)` and `ioctl(TCGETS)`, so that whichever thread ends the
//! process can put back the terminal it found; any other `ioctl` is checked
//! by request. A VM's devices may ask for more
//! ([`VmBuilder::allow_syscalls`](crate::VmBuilder::allow_syscalls),
//! [`VmBuilder::allow_ioctls`](crate::VmBuilder::allow_ioctls)).
//!
//! The common set is what any Rust thread needs to run and end: `read`,
//! `write`, `close`, `futex`, memory management (`mmap`, `munmap`,
//! `mprotect`, `madvise`, `brk`), signal return and masks, `sigaltstack`,
//! sleeping, `sched_yield`, `exit`, `exit_group`. No thread may open files,
//! create sockets, fork or exec.

use std::collections::BTreeMap;
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t};
use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;

/// The kinds of VMM thread, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The device event loop.
    EventLoop,
    /// A thread that reads host input for a device.
    Input,
    /// The thread that built the VM and waits for it.
    Main,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Input,
        ThreadKind::Main,
    ];
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The filter could not be compiled to BPF.
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    /// The thread compiling the filters panicked.
    #[error("the seccomp filter compiler panicked")]
    CompilerPanicked,
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xae << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_WRITE: u64 = 1;
/// `KVM_RUN`.
const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_GET_REGS`.
const KVM_GET_REGS: u64 = ioc(
    IOC_READ,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as u64,
);
/// `KVM_GET_SREGS`.
const KVM_GET_SREGS: u64 = ioc(
    IOC_READ,
    0x83,
    std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64,
);
/// `KVM_TRANSLATE`.
const KVM_TRANSLATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x85,
    std::mem::size_of::<kvm_bindings::kvm_translation>() as u64,
);

const fn ior<T>(nr: u64) -> u64 {
    ioc(IOC_READ, nr, std::mem::size_of::<T>() as u64)
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>() as u64)
}

/// The vCPU ioctls that read what a snapshot saves of a (paused) vCPU.
pub const VCPU_SAVE_IOCTLS: [u64; 9] = [
    iowr::<kvm_bindings::kvm_msrs>(0x88),
    iowr::<kvm_bindings::kvm_cpuid2>(0x91),
    ior::<kvm_bindings::kvm_lapic_state>(0x8e),
    ior::<kvm_bindings::kvm_mp_state>(0x98),
    ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
    ior::<kvm_bindings::kvm_debugregs>(0xa1),
    ior::<kvm_bindings::kvm_xsave>(0xa4),
    ior::<kvm_bindings::kvm_xcrs>(0xa6),
    ioc(0, 0xa3, 0),
];

/// The VM ioctls that read what a snapshot saves of a VM (irqchip, PIT,
/// clock) and the dirty log of a diff snapshot; allowed on the main thread,
/// which takes snapshots.
pub const VM_SAVE_IOCTLS: [u64; 4] = [
    iowr::<kvm_bindings::kvm_irqchip>(0x62),
    ior::<kvm_bindings::kvm_pit_state2>(0x9f),
    ior::<kvm_bindings::kvm_clock_data>(0x7c),
    ioc(
        IOC_WRITE,
        0x42,
        std::mem::size_of::<kvm_bindings::kvm_dirty_log>() as u64,
    ),
];

/// What a device does when the driver starts it (on the vCPU thread that
/// wrote the status register, or the main thread of a restore):
/// `TUNSETOFFLOAD`, a NIC setting its TAP's offloads.
pub const ACTIVATION_IOCTLS: [u64; 1] = [0x4004_54d0];

const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    // The allocator grows large buffers in place.
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_fcntl,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `TCSETS` and `TCGETS`: setting a terminal's attributes (glibc's
/// `tcsetattr` reads them back to check), allowed on every thread so that
/// whichever thread ends the process can restore the terminal it found.
const TERMINAL_IOCTLS: [u64; 2] = [libc::TCSETS, libc::TCGETS];

fn rules(
    kind: ThreadKind,
    extra_calls: &[i64],
    extra_ioctls: &[u64],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&s| (s, Vec::new())).collect();
    let extra: &[i64] = match kind {
        ThreadKind::Vcpu => &[],
        ThreadKind::EventLoop => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_lseek,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
            libc::SYS_getrandom,
            // A NIC's frames to and from its TAP; rate limiters' timers.
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_timerfd_settime,
        ],
        ThreadKind::Input => &[],
        // Kicks vCPUs out of the guest; flushes disks at the orderly stop.
        // Rate limits changed at run time re-arm the device's timer.
        ThreadKind::Main => &[
            libc::SYS_tgkill,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_timerfd_settime,
        ],
    };
    for &s in extra.iter().chain(extra_calls) {
        map.insert(s, Vec::new());
    }
    let ioctl = |req: u64| -> Result<SeccompRule, SeccompError> {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
            .map_err(SeccompError::Build)?;
        SeccompRule::new(vec![cond]).map_err(SeccompError::Build)
    };
    let vcpu = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_TRANSLATE];
    let kvm: Vec<u64> = match kind {
        ThreadKind::Vcpu => vcpu
            .iter()
            .chain(&VCPU_SAVE_IOCTLS)
            .chain(&ACTIVATION_IOCTLS)
            .copied()
            .collect(),
        ThreadKind::Main => VM_SAVE_IOCTLS
            .iter()
            .chain(&ACTIVATION_IOCTLS)
            .copied()
            .collect(),
        _ => Vec::new(),
    };
    // ioctl is allowed by request only, whatever `extra_calls` said.
    map.insert(
        libc::SYS_ioctl,
        kvm.iter()
            .chain(&TERMINAL_IOCTLS)
            .chain(extra_ioctls)
            .map(|&r| ioctl(r))
            .collect::<Result<_, _>>()?,
    );
    Ok(map)
}

/// The BPF program of `kind`'s filter.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    program_with(kind, &[], &[])
}

/// The BPF program of `kind`'s filter, also allowing `extra_calls` (system
/// call numbers, `libc::SYS_*`) with any arguments and `ioctl` with the
/// requests in `extra_ioctls`: what a device's own code on that thread
/// needs. `ioctl` itself is always checked by request.
pub fn program_with(
    kind: ThreadKind,
    extra_calls: &[i64],
    extra_ioctls: &[u64],
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind, extra_calls, extra_ioctls)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// The terminal to put back as it was if a blocked system call ends the
/// process (set by [`restore_terminal_on_sigsys`]).
static TERMINAL: std::sync::OnceLock<(c_int, libc::termios)> = std::sync::OnceLock::new();

/// Asks the SIGSYS handler to restore `fd`'s terminal settings to `saved`
/// before it ends the process (a VMM that put the terminal in raw mode
/// would otherwise leave it so). Only the first call counts.
pub fn restore_terminal_on_sigsys(fd: c_int, saved: libc::termios) {
    let _ = TERMINAL.set((fd, saved));
}

extern "C" fn sigsys_handler(_: c_int, info: *mut siginfo_t, _: *mut c_void) {
    if let Some((fd, t)) = TERMINAL.get() {
        // SAFETY: tcsetattr (an ioctl every filter allows) is
        // async-signal-safe; `t` is a valid termios.
        unsafe { libc::tcsetattr(*fd, libc::TCSANOW, t) };
    }
    // SAFETY: for SIGSYS raised by seccomp the kernel fills the `_sigsys`
    // member of siginfo: on x86_64 the system call number is the int at byte
    // offset 24 (after si_signo, si_errno, si_code, padding, _call_addr).
    let nr = unsafe { *(info as *const u8).add(24).cast::<c_int>() };
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut n = nr.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"vmm: seccomp blocked system call ",
        &digits[at..],
        b"; run with --no-seccomp to debug\n",
    ];
    // SAFETY: write(2) and _exit(2) are async-signal-safe; each part is a
    // valid buffer of its length.
    unsafe {
        for p in parts {
            libc::write(2, p.as_ptr().cast(), p.len());
        }
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Installs `kind`'s filter on the calling thread (and the threads it will
/// create). The filter cannot be removed.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    install_program(&program(kind)?)
}

/// Installs a compiled filter on the calling thread (and the threads it will
/// create), with the SIGSYS handler that names a blocked call.
pub fn install_program(prog: &BpfProgram) -> Result<(), SeccompError> {
    static HANDLER: Once = Once::new();
    let mut handler_result = Ok(());
    HANDLER.call_once(|| handler_result = register_signal_handler(libc::SIGSYS, sigsys_handler));
    handler_result.map_err(SeccompError::Handler)?;
    apply_filter(prog).map_err(SeccompError::Apply)
}

/// The compiled filter of each kind of thread, with the extra system calls
/// a VM's devices asked for; `None` everywhere when filters are off.
#[derive(Clone, Debug, Default)]
pub struct ThreadFilters {
    programs: BTreeMap<u8, BpfProgram>,
}

impl ThreadFilters {
    /// No filters.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every kind's filter, each also allowing the system calls and ioctl
    /// requests `extra(kind)` gives.
    pub fn build(extra: impl Fn(ThreadKind) -> (Vec<i64>, Vec<u64>)) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let (calls, ioctls) = extra(kind);
            programs.insert(kind as u8, program_with(kind, &calls, &ioctls)?);
        }
        Ok(Self { programs })
    }

    /// `kind`'s filter, if filters are on.
    pub fn get(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs.get(&(kind as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        // From include/uapi/linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(
            VCPU_SAVE_IOCTLS,
            [
                0xc008_ae88,
                0xc008_ae91,
                0x8400_ae8e,
                0x8004_ae98,
                0x8040_ae9f,
                0x8080_aea1,
                0x9000_aea4,
                0x8188_aea6,
                0xaea3
            ]
        );
        assert_eq!(
            VM_SAVE_IOCTLS,
            [0xc208_ae62, 0x8070_ae9f, 0x8030_ae7c, 0x4010_ae42]
        );
    }

    #[test]
    fn extra_calls_are_added_but_do_not_lift_argument_checks() {
        let r = rules(ThreadKind::EventLoop, &[libc::SYS_sendmsg], &[]).unwrap();
        assert!(r.contains_key(&libc::SYS_sendmsg));
        let r = rules(ThreadKind::Vcpu, &[libc::SYS_ioctl], &[]).unwrap();
        assert_eq!(
            r[&libc::SYS_ioctl].len(),
            6 + VCPU_SAVE_IOCTLS.len() + ACTIVATION_IOCTLS.len(),
            "still only the KVM ioctls, the NIC's offloads and the terminal's two"
        );
        let r = rules(ThreadKind::Main, &[], &[libc::TIOCGWINSZ]).unwrap();
        assert_eq!(
            r[&libc::SYS_ioctl].len(),
            3 + VM_SAVE_IOCTLS.len() + ACTIVATION_IOCTLS.len(),
            "the VM state reads, the NIC's offloads, the terminal's two and the one asked for"
        );
        let filters = ThreadFilters::build(|k| {
            if k == ThreadKind::Input {
                (vec![libc::SYS_sendmsg], Vec::new())
            } else {
                (Vec::new(), Vec::new())
            }
        })
        .unwrap();
        for kind in ThreadKind::ALL {
            assert!(filters.get(kind).is_some());
        }
        assert!(ThreadFilters::none().get(ThreadKind::Vcpu).is_none());
    }

    #[test]
    fn the_activation_ioctl_is_tunsetoffload() {
        // _IOW('T', 208, unsigned int)
        let tunsetoffload = (1u64 << 30) | (4 << 16) | ((b'T' as u64) << 8) | 208;
        assert_eq!(ACTIVATION_IOCTLS, [tunsetoffload]);
    }

    #[test]
    fn every_filter_compiles() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::Input,
            ThreadKind::Main,
        ] {
            assert!(!program(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn only_vcpus_may_run_and_no_thread_may_open_or_exec() {
        for kind in [ThreadKind::EventLoop, ThreadKind::Input] {
            assert_eq!(
                rules(kind, &[], &[]).unwrap()[&libc::SYS_ioctl].len(),
                2,
                "{kind:?}: the terminal's two only"
            );
        }
        assert_eq!(
            rules(ThreadKind::Main, &[], &[]).unwrap()[&libc::SYS_ioctl].len(),
            2 + VM_SAVE_IOCTLS.len() + ACTIVATION_IOCTLS.len(),
            "main: the terminal's two, the VM state reads and the NIC's offloads only"
        );
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::Input,
            ThreadKind::Main,
        ] {
            let r = rules(kind, &[], &[]).unwrap();
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_clone,
            ] {
                assert!(!r.contains_key(&forbidden), "{kind:?} allows {forbidden}");
            }
        }
    }
}

/// Which threads a [`Vmm`](crate::Vmm) confines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompPolicy {
    /// No filters (for debugging).
    Disabled,
    /// The threads the VMM starts: vCPUs, the event loop, input pumps.
    #[default]
    VmmThreads,
    /// Those, and the thread that calls [`Vmm::run`](crate::Vmm::run), once
    /// the VMM's threads are started. That thread can then no longer open
    /// files or start threads: meant for a process whose job is one VM.
    VmmThreadsAndCaller,
}

impl SeccompPolicy {
    /// Whether VMM threads are confined.
    pub fn confines_threads(self) -> bool {
        self != SeccompPolicy::Disabled
    }
}

/// Why a confined thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The OS refused the thread.
    #[error("cannot start thread {name}")]
    Thread {
        /// Thread name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not install its filter (it ended without running).
    #[error("thread {name} could not install its seccomp filter")]
    Filter {
        /// Thread name.
        name: String,
        /// Why.
        #[source]
        source: SeccompError,
    },
}

/// Starts `f` on a thread named `name` that installs `filter` first (no
/// filter: `f` runs unconfined), and waits until the filter is in place: an
/// error if it could not be installed (the thread then ends without running
/// `f`).
pub fn spawn_confined<T, F>(
    name: String,
    filter: Option<BpfProgram>,
    f: F,
) -> Result<std::thread::JoinHandle<Option<T>>, SpawnError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_confined_unconfirmed(name, filter, f)?.confirm()
}

/// A thread [`spawn_confined_unconfirmed`] started, whose filter may not be
/// in place yet.
pub struct PendingThread<T> {
    name: String,
    handle: std::thread::JoinHandle<Option<T>>,
    installed: std::sync::mpsc::Receiver<Result<(), SeccompError>>,
}

impl<T> PendingThread<T> {
    /// Waits until the thread's filter is in place (see
    /// [`spawn_confined`]).
    pub fn confirm(self) -> Result<std::thread::JoinHandle<Option<T>>, SpawnError> {
        match self.installed.recv() {
            Ok(Ok(())) => Ok(self.handle),
            Ok(Err(source)) => Err(SpawnError::Filter {
                name: self.name,
                source,
            }),
            Err(_) => Err(SpawnError::Thread {
                name: self.name,
                source: std::io::Error::other("thread ended at start"),
            }),
        }
    }
}

/// Like [`spawn_confined`] without the wait: several threads start at once
/// and are confirmed together. `f` never runs unconfined either way.
pub fn spawn_confined_unconfirmed<T, F>(
    name: String,
    filter: Option<BpfProgram>,
    f: F,
) -> Result<PendingThread<T>, SpawnError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let installed = match &filter {
                Some(p) => install_program(p),
                None => Ok(()),
            };
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            ok.then(f)
        })
        .map_err(|source| SpawnError::Thread {
            name: name.clone(),
            source,
        })?;
    Ok(PendingThread {
        name,
        handle,
        installed: rx,
    })
}
