//! The KVM virtual machine: memslots, the in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_API_VERSION, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_memory::GuestRam;
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Vcpu;

/// Guest physical address of the 3-page TSS area KVM needs on Intel hosts;
/// it sits in the MMIO gap, just below the BIOS area at the top of 4 GiB.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VM could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and may this user use it?)")]
    OpenKvm(#[source] errno::Error),
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0:?} capability")]
    MissingCapability(Cap),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: errno::Error,
    },
    /// A region's host address could not be found.
    #[error("guest RAM region at {0:#x} has no host mapping")]
    HostAddress(u64),
    /// A saved VM state cannot be restored.
    #[error("saved VM state: {what} is invalid: {why}")]
    BadState {
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// The in-kernel devices' state of a VM: both PICs, the IOAPIC, the PIT
/// and the KVM clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT's three channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest time).
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Checks each chip is the one its field names.
    pub fn validate(&self) -> Result<(), VmError> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(VmError::BadState {
                    what: "irqchip",
                    why: format!("chip {} where chip {id} belongs", chip.chip_id),
                });
            }
        }
        Ok(())
    }
}

/// KVM modules known not to apply `KVM_SET_CPUID2` fully: the guest sees
/// most of the host's CPUID bits whatever the VMM sets (its APIC IDs and
/// topology included).
const CPUID_IGNORING_MODULES: &[&str] = &["kvm_pvm"];

/// Says once, as a warning, when this host's KVM is one of
/// [`CPUID_IGNORING_MODULES`].
fn warn_if_cpuid_is_not_honoured() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for m in CPUID_IGNORING_MODULES {
            if std::path::Path::new("/sys/module").join(m).exists() {
                log::warn!(
                    "this host's KVM ({m}) does not apply KVM_SET_CPUID2 fully: the guest sees \
                     most of the host's CPUID bits, whatever topology and features this VMM sets"
                );
            }
        }
    });
}

fn kvm_err(what: &'static str) -> impl FnOnce(errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its guest RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestRam,
    msr_indices: std::sync::Arc<[u32]>,
    dirty_tracking: bool,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM backed by `memory`, with an in-kernel
    /// irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new(memory: GuestRam) -> Result<Self, VmError> {
        Self::with_dirty_tracking(memory, false)
    }

    /// Like [`new`](Vm::new); with `track`, KVM logs the pages the guest
    /// writes ([`take_dirty_log`](Vm::take_dirty_log)).
    pub fn with_dirty_tracking(memory: GuestRam, track: bool) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::SetTssAddr,
            Cap::Pit2,
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(cap));
            }
        }
        warn_if_cpuid_is_not_honoured();
        let fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .into();
        let vm = Self {
            kvm,
            fd,
            memory,
            msr_indices,
            dirty_tracking: track,
        };
        // Memory before the irqchip: once the irqchip exists, a memslot
        // update waits for KVM's SRCU readers (about 6 ms for one slot on
        // the hosts measured, against 0.1 ms before it).
        vm.register_memory()?;
        vm.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("TSS address setup"))?;
        vm.fd
            .create_irq_chip()
            .map_err(kvm_err("irqchip creation"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let start = region.start_addr().0;
            let host = self
                .memory
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::HostAddress(start))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if self.dirty_tracking {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned
            // by `self.memory`, which the VM keeps until it is dropped (and the
            // VM fd, and with it the memslot, goes away with it).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("memslot registration"))?;
        }
        Ok(())
    }

    /// Whether KVM logs the pages the guest writes.
    pub fn tracks_dirty_pages(&self) -> bool {
        self.dirty_tracking
    }

    /// The pages the guest wrote in each memslot (each RAM region, in
    /// order; one bit per 4 KiB page) since the last call or since the VM
    /// was made, and clears the log. Empty bitmaps without tracking.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        if !self.dirty_tracking {
            return Ok(Vec::new());
        }
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let size = usize::try_from(region.len())
                    .map_err(|_| VmError::HostAddress(region.start_addr().0))?;
                self.fd
                    .get_dirty_log(slot as u32, size)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
            })
            .collect()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Routes `evt` to interrupt line `gsi`: each write to it raises the line.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("irqfd registration"))
    }

    /// Makes KVM signal `evt` on a `u32` write of `datamatch` to `addr`,
    /// without an exit to userspace.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: &IoEventAddress,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, addr, datamatch)
            .map_err(kvm_err("ioeventfd registration"))
    }

    /// Captures the in-kernel irqchip, PIT and clock. The vCPUs should not be
    /// running.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts a saved state back, after [`VmState::validate`]. The clock
    /// carries on from the saved guest time.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        state.validate()?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK takes only the time (and KVM_CLOCK_REALTIME with its
        // field); the flags KVM_GET_CLOCK reports describe this host.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("vCPU creation"))?;
        Ok(Vcpu::new(id, fd, self.msr_indices.clone()))
    }
}
