//! vCPUs: setup from a [`BootCpuState`], the run loop and its thread.

mod exit;
mod state;
mod thread;

use std::fmt;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_device::device_manager::IoManager;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_boot::{BootCpuState, Segment};
use vmm_sys_util::errno;

pub use exit::{handle_exit, StopReason, VcpuEmulation};
pub use state::{VcpuState, MAX_SAVED_MSRS, XSAVE_WORDS};
pub use thread::{kick_signal, VcpuCommand, VcpuHandle, VcpuRunState};

/// What KVM said about an internal error (`KVM_EXIT_INTERNAL_ERROR`), with
/// where the guest was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InternalErrorInfo {
    /// `suberror` (1: emulation failure, 2: simultaneous exceptions, 3:
    /// delivery event, 4: unexpected exit reason).
    pub suberror: u32,
    /// The `data` words KVM gave.
    pub data: Vec<u64>,
    /// The guest RIP, if readable.
    pub rip: Option<u64>,
    /// Up to 15 instruction bytes at RIP, if they could be read.
    pub instruction: Vec<u8>,
}

impl fmt::Display for InternalErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "event delivery failure",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        write!(f, "suberror {} ({kind})", self.suberror)?;
        if let Some(rip) = self.rip {
            write!(f, ", rip {rip:#x}")?;
        }
        if !self.instruction.is_empty() {
            let bytes: Vec<String> = self
                .instruction
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            write!(f, ", instruction bytes [{}]", bytes.join(" "))?;
        }
        let data: Vec<String> = self.data.iter().map(|d| format!("{d:#x}")).collect();
        write!(f, ", data [{}]", data.join(", "))
    }
}

/// Why a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl used in setup failed.
    #[error("vCPU setup: {what} failed")]
    Setup {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: errno::Error,
    },
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed")]
    Run(#[source] errno::Error),
    /// `KVM_EXIT_FAIL_ENTRY`: the CPU refused to enter the guest.
    #[error("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}")]
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The physical CPU.
        cpu: u32,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`.
    #[error("KVM_EXIT_INTERNAL_ERROR: {0}")]
    InternalError(InternalErrorInfo),
    /// An exit this VMM does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread")]
    Spawn(#[from] crate::seccomp::SpawnError),
    /// A saved state cannot be restored.
    #[error("saved vCPU state: {what} is invalid: {why}")]
    BadState {
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
}

fn setup_err(what: &'static str) -> impl FnOnce(errno::Error) -> VcpuError {
    move |source| VcpuError::Setup { what, source }
}

/// One vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    metrics: std::sync::Arc<vmm_devices::metrics::VcpuMetrics>,
    /// The MSRs KVM lists for saving (from the VM, read once).
    msr_indices: std::sync::Arc<[u32]>,
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kvm_segment_from(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: (!s.present).into(),
        padding: 0,
    }
}

/// Applies the boot state to `sregs`, keeping the fields KVM set that the
/// state does not describe (APIC base, interrupt bitmap, ...).
pub fn apply_sregs(sregs: &mut kvm_sregs, s: &BootCpuState) {
    sregs.cs = kvm_segment_from(&s.cs);
    sregs.ds = kvm_segment_from(&s.ds);
    sregs.es = kvm_segment_from(&s.es);
    sregs.fs = kvm_segment_from(&s.fs);
    sregs.gs = kvm_segment_from(&s.gs);
    sregs.ss = kvm_segment_from(&s.ss);
    sregs.tr = kvm_segment_from(&s.tr);
    sregs.gdt.base = s.gdt.base;
    sregs.gdt.limit = s.gdt.limit;
    sregs.idt.base = s.idt.base;
    sregs.idt.limit = s.idt.limit;
    sregs.cr0 = s.cr0;
    sregs.cr3 = s.cr3;
    sregs.cr4 = s.cr4;
    sregs.efer = s.efer;
}

/// The general registers of the boot state.
pub fn boot_regs(s: &BootCpuState) -> kvm_regs {
    kvm_regs {
        rip: s.rip,
        rsp: s.rsp,
        rbp: s.rbp,
        rsi: s.rsi,
        rbx: s.rbx,
        rflags: s.rflags,
        ..Default::default()
    }
}

/// What vCPU `id` of `vcpus` is shown of one CPUID entry: its APIC ID, a
/// topology of `vcpus` cores with one thread each in one package (leaves
/// 0x1, 0xB, 0x1F and AMD's 0x8000001E), and the hypervisor bit. Every other bit
/// is what KVM supports on this host. (Some nested hosts do not apply
/// KVM_SET_CPUID2 fully; the guest then sees the host's own values there.)
pub fn cpuid_entry_for(e: &mut kvm_bindings::kvm_cpuid_entry2, id: u8, vcpus: u8) {
    let id32 = u32::from(id);
    let count = u32::from(vcpus.max(1));
    // Bits of the APIC ID that number the cores.
    let core_bits = 32 - (count - 1).leading_zeros();
    match e.function {
        1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | (count << 16) | (id32 << 24);
            if count > 1 {
                e.edx |= 1 << 28; // HTT: more than one logical processor
            } else {
                e.edx &= !(1 << 28);
            }
            e.ecx |= 1 << 31; // a hypervisor is present
        }
        // 0x1F is 0xB's successor, with the same layout for these levels.
        0xb | 0x1f => {
            let (shift, processors, level_type) = match e.index {
                0 => (0, 1, 1),             // SMT level: one thread per core
                1 => (core_bits, count, 2), // core level: every vCPU
                _ => (0, 0, 0),             // no such level
            };
            e.eax = shift;
            e.ebx = processors;
            e.ecx = (level_type << 8) | (e.index & 0xff);
            e.edx = id32;
        }
        0x8000_001e => {
            e.eax = id32; // extended APIC ID
            e.ebx = id32; // compute unit (core) ID, one thread per unit
        }
        _ => {}
    }
}

impl Vcpu {
    pub(crate) fn new(id: u8, fd: VcpuFd, msr_indices: std::sync::Arc<[u32]>) -> Self {
        Self {
            id,
            fd,
            metrics: Default::default(),
            msr_indices,
        }
    }

    /// Counts this vCPU's exits into `metrics` (shared by a VM's vCPUs).
    pub fn set_metrics(&mut self, metrics: std::sync::Arc<vmm_devices::metrics::VcpuMetrics>) {
        self.metrics = metrics;
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID (this vCPU's APIC ID in a topology of `vcpus`), MSRs, the
    /// FPU and the LAPIC's LINT pins; and, for the bootstrap processor
    /// (`boot` given), the boot registers. An application processor keeps
    /// KVM's reset state and waits in the in-kernel LAPIC for the guest's
    /// INIT and startup IPIs, as on real hardware.
    pub fn configure(
        &self,
        kvm: &Kvm,
        vcpus: u8,
        boot: Option<&BootCpuState>,
    ) -> Result<(), VcpuError> {
        self.configure_cpuid(kvm, vcpus)?;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::Setup {
            what: "MSR list",
            source: errno::Error::new(libc::EINVAL),
        })?;
        self.fd.set_msrs(&msrs).map_err(setup_err("KVM_SET_MSRS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(setup_err("KVM_SET_FPU"))?;
        self.configure_lapic()?;
        let Some(state) = boot else {
            return Ok(());
        };
        let mut sregs = self.fd.get_sregs().map_err(setup_err("KVM_GET_SREGS"))?;
        apply_sregs(&mut sregs, state);
        self.fd
            .set_sregs(&sregs)
            .map_err(setup_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&boot_regs(state))
            .map_err(setup_err("KVM_SET_REGS"))
    }

    fn configure_cpuid(&self, kvm: &Kvm, vcpus: u8) -> Result<(), VcpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup_err("KVM_GET_SUPPORTED_CPUID"))?;
        for e in cpuid.as_mut_slice() {
            cpuid_entry_for(e, self.id, vcpus);
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(setup_err("KVM_SET_CPUID2"))
    }

    fn configure_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(setup_err("KVM_GET_LAPIC"))?;
        let set_mode = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
            let mut v = [0u8; 4];
            for (i, b) in v.iter_mut().enumerate() {
                *b = regs[off + i] as u8;
            }
            let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                regs[off + i] = *b as libc::c_char;
            }
        };
        // LINT0 carries the legacy PIC's interrupts, LINT1 NMIs.
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(setup_err("KVM_SET_LAPIC"))
    }

    /// Runs the guest until one exit, handled by [`handle_exit`]. Internal
    /// errors come back with KVM's data, the RIP and the instruction bytes.
    pub fn run_once<M: GuestMemoryBackend>(
        &mut self,
        bus: &IoManager,
        mem: &M,
    ) -> Result<VcpuEmulation, VcpuError> {
        let exit = self.fd.run();
        let m = &self.metrics;
        match &exit {
            Ok(VcpuExit::IoIn(..)) => m.exit_io_in.inc(),
            Ok(VcpuExit::IoOut(..)) => m.exit_io_out.inc(),
            Ok(VcpuExit::MmioRead(..)) => m.exit_mmio_read.inc(),
            Ok(VcpuExit::MmioWrite(..)) => m.exit_mmio_write.inc(),
            _ => {}
        }
        let result = handle_exit(exit, bus);
        if result.is_err() {
            self.metrics.failures.inc();
        }
        match result {
            Err(VcpuError::InternalError(_)) => {
                Err(VcpuError::InternalError(self.internal_error_info(mem)))
            }
            other => other,
        }
    }

    fn internal_error_info<M: GuestMemoryBackend>(&mut self, mem: &M) -> InternalErrorInfo {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is
        // the union member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let mut info = InternalErrorInfo {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            ..Default::default()
        };
        if let Ok(regs) = self.fd.get_regs() {
            info.rip = Some(regs.rip);
            if let Ok(t) = self.fd.translate_gva(regs.rip) {
                if t.valid != 0 {
                    let mut bytes = [0u8; 15];
                    for (i, b) in bytes.iter_mut().enumerate() {
                        match mem.read_obj::<u8>(GuestAddress(t.physical_address + i as u64)) {
                            Ok(v) => *b = v,
                            Err(_) => break,
                        }
                        info.instruction.push(*b);
                    }
                }
            }
        }
        info
    }

    /// Sets or clears `immediate_exit` in the shared run structure.
    pub(crate) fn set_immediate_exit(&mut self, v: u8) {
        self.fd.set_kvm_immediate_exit(v);
    }

    /// Finishes the port or MMIO access the last exit handed to userspace:
    /// KVM completes it (a read's value into the guest's register) only on
    /// the next `KVM_RUN`, so this enters with `immediate_exit` set, which
    /// completes it and returns before the guest runs another instruction.
    /// Called before a pause, so that the state then saved is whole.
    pub(crate) fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.set_immediate_exit(1);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VcpuError::Run(e)),
            // Not expected: immediate_exit returns before the guest runs.
            Ok(_) => Ok(()),
        };
        self.set_immediate_exit(0);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn boot_state_maps_onto_kvm_registers() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let state = vmm_boot::cpu::linux64_cpu_state(&mem, 0x10_0000, 0x7000).unwrap();
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        apply_sregs(&mut sregs, &state);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!((sregs.cs.l, sregs.cs.present, sregs.cs.unusable), (1, 1, 0));
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.efer, state.efer);
        assert_eq!(sregs.cr3, state.cr3);
        assert_eq!(
            sregs.apic_base, 0xfee0_0900,
            "fields outside the boot state are kept"
        );
        let regs = boot_regs(&state);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x10_0000, 0x7000, 2));
    }

    #[test]
    fn cpuid_shows_each_vcpu_its_apic_id_and_the_topology() {
        let entry = |function, index| kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        };
        let mut e = entry(1, 0);
        cpuid_entry_for(&mut e, 5, 8);
        assert_eq!(e.ebx >> 24, 5, "initial APIC ID");
        assert_eq!((e.ebx >> 16) & 0xff, 8, "logical processors");
        assert_eq!(e.ebx & 0xffff, 0x0800, "the rest kept");
        assert_ne!(e.edx & (1 << 28), 0);
        assert_ne!(e.ecx & (1 << 31), 0, "hypervisor bit");
        for leaf in [0xb, 0x1f] {
            let mut smt = entry(leaf, 0);
            let mut core = entry(leaf, 1);
            cpuid_entry_for(&mut smt, 5, 8);
            cpuid_entry_for(&mut core, 5, 8);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 8, 2, 5));
        }
        let mut one = entry(1, 0);
        one.edx = 1 << 28;
        cpuid_entry_for(&mut one, 0, 1);
        assert_eq!(one.edx & (1 << 28), 0, "no HTT with one vCPU");
        let mut amd = entry(0x8000_001e, 0);
        cpuid_entry_for(&mut amd, 200, 254);
        assert_eq!(amd.eax, 200);
    }

    #[test]
    fn internal_error_info_names_the_suberror_and_bytes() {
        let info = InternalErrorInfo {
            suberror: 1,
            data: vec![0x1],
            rip: Some(0x1000),
            instruction: vec![0x0f, 0xc7],
        };
        let s = info.to_string();
        assert!(
            s.contains("emulation failure") && s.contains("rip 0x1000") && s.contains("0f c7"),
            "{s}"
        );
    }
}
