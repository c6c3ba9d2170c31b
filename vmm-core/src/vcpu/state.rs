//! A vCPU's whole architectural state as plain serde data: what a snapshot
//! saves and a restore puts back, checked before it reaches KVM.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;

use super::{setup_err, Vcpu, VcpuError};

/// Most MSRs a saved state may carry (KVM lists a few hundred).
pub const MAX_SAVED_MSRS: usize = 1024;
/// Highest `mp_state` value KVM defines (`KVM_MP_STATE_AP_RESET_HOLD`).
const MAX_MP_STATE: u32 = 9;
/// 32-bit words of the legacy 4 KiB xsave area KVM saves.
pub const XSAVE_WORDS: usize = 1024;
/// Most extended control registers (`KVM_MAX_XCRS`).
const MAX_XCRS: u32 = 16;

/// Everything KVM keeps of a vCPU: registers, special registers, FPU and
/// extended state (xsave), XCRs, MSRs (with the paravirtual clock and APIC
/// ones), the local APIC, the multiprocessing state, pending events, debug
/// registers, CPUID and the TSC frequency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU index (its APIC ID).
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the 4 KiB xsave area, as
    /// [`XSAVE_WORDS`] 32-bit words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Model-specific registers, each KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for INIT/SIPI, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency in kHz, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn invalid(what: &'static str, why: String) -> VcpuError {
    VcpuError::BadState { what, why }
}

impl VcpuState {
    /// Checks what KVM would not: bounds on the lists, values in range, and
    /// that the state belongs to vCPU `id`.
    pub fn validate(&self, id: u8) -> Result<(), VcpuError> {
        if self.id != id {
            return Err(invalid(
                "vCPU index",
                format!("the state is of vCPU {}, restored into vCPU {id}", self.id),
            ));
        }
        if self.msrs.len() > MAX_SAVED_MSRS {
            return Err(invalid(
                "MSR list",
                format!("{} entries, at most {MAX_SAVED_MSRS}", self.msrs.len()),
            ));
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(
                "CPUID",
                format!(
                    "{} entries, between 1 and {KVM_MAX_CPUID_ENTRIES}",
                    self.cpuid.len()
                ),
            ));
        }
        if self.mp_state.mp_state > MAX_MP_STATE {
            return Err(invalid(
                "MP state",
                format!("{} is not a KVM MP state", self.mp_state.mp_state),
            ));
        }
        if self.xcrs.nr_xcrs > MAX_XCRS {
            return Err(invalid(
                "XCR count",
                format!("{}, at most {MAX_XCRS}", self.xcrs.nr_xcrs),
            ));
        }
        if self.xsave.len() != XSAVE_WORDS {
            return Err(invalid(
                "xsave area",
                format!("{} words, expected {XSAVE_WORDS}", self.xsave.len()),
            ));
        }
        if self.tsc_khz == Some(0) {
            return Err(invalid("TSC frequency", "0 kHz".into()));
        }
        Ok(())
    }
}

/// The MSRs of `indices` KVM can read for a vCPU, less those a read refuses
/// (KVM stops a batch at the first one it cannot read).
fn read_msrs(vcpu: &Vcpu, mut indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    while !indices.is_empty() {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
            what: "MSR list",
            source: errno::Error::new(libc::EINVAL),
        })?;
        let read = vcpu
            .fd
            .get_msrs(&mut msrs)
            .map_err(setup_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one it refused, go on with the rest.
        indices = indices.get(read + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

impl Vcpu {
    /// Captures the vCPU's state. The vCPU must not be running (its thread
    /// paused or ended). `kvm` is not needed any more (the MSR list is
    /// read when the vCPU is created); it stays for compatibility.
    pub fn save_state(&self, kvm: &Kvm) -> Result<VcpuState, VcpuError> {
        let _ = kvm;
        self.capture_state()
    }

    /// The CPUID KVM reports for this vCPU now.
    pub(crate) fn current_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, VcpuError> {
        Ok(self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec())
    }

    /// Captures the vCPU's state; see [`save_state`](Vcpu::save_state).
    pub(crate) fn capture_state(&self) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup_err("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            id: self.id,
            regs: fd.get_regs().map_err(setup_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(setup_err("KVM_GET_SREGS"))?,
            xsave: fd
                .get_xsave()
                .map_err(setup_err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().map_err(setup_err("KVM_GET_XCRS"))?,
            msrs: read_msrs(self, &self.msr_indices)?,
            lapic: fd.get_lapic().map_err(setup_err("KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(setup_err("KVM_GET_MP_STATE"))?,
            events: fd
                .get_vcpu_events()
                .map_err(setup_err("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(setup_err("KVM_GET_DEBUGREGS"))?,
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts a saved state back, after [`VcpuState::validate`]. CPUID goes
    /// first (it decides which MSRs and xsave features exist), pending
    /// events last.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        state.validate(self.id)?;
        let fd = &self.fd;
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|_| invalid("CPUID", format!("{} entries", state.cpuid.len())))?;
        fd.set_cpuid2(&cpuid).map_err(setup_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = state.tsc_khz {
            let here = fd.get_tsc_khz().ok();
            if here != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    // The kvmclock keeps guest time right; only raw TSC
                    // readers see another rate.
                    log::warn!(
                        "vCPU {}: the snapshot's TSC ran at {khz} kHz, this host's at {} kHz and \
                         KVM cannot scale it ({e}): the guest's TSC now runs at this host's rate",
                        self.id,
                        here.map_or_else(|| "an unknown".to_string(), |k| k.to_string())
                    );
                }
            }
        }
        fd.set_mp_state(state.mp_state)
            .map_err(setup_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs)
            .map_err(setup_err("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs)
            .map_err(setup_err("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&state.xsave);
        // SAFETY: `kvm_xsave` is the 4 KiB legacy layout; this VMM never
        // enables dynamic xsave features (ARCH_REQ_XCOMP_GUEST_PERM), so the
        // kernel reads no more than that.
        unsafe { fd.set_xsave(&xsave) }.map_err(setup_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs)
            .map_err(setup_err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(setup_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic)
            .map_err(setup_err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs)
            .map_err(|_| invalid("MSR list", format!("{} entries", state.msrs.len())))?;
        let written = fd.set_msrs(&msrs).map_err(setup_err("KVM_SET_MSRS"))?;
        if written != state.msrs.len() {
            let refused = state.msrs.get(written).map_or(0, |m| m.index);
            return Err(invalid(
                "MSR list",
                format!(
                    "KVM refused MSR {refused:#x} ({written} of {} set)",
                    state.msrs.len()
                ),
            ));
        }
        fd.set_vcpu_events(&state.events)
            .map_err(setup_err("KVM_SET_VCPU_EVENTS"))
    }
}
