//! The KVM virtual machine: memslots, the in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its guest RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestRam,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM backed by `memory`, with an in-kernel
    /// irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new(memory: GuestRam) -> Result<Self, VmError> {
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
        let fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("TSS address setup"))?;
        fd.create_irq_chip().map_err(kvm_err("irqchip creation"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;
        let vm = Self { kvm, fd, memory };
        vm.register_memory()?;
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
                flags: 0,
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

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("vCPU creation"))?;
        Ok(Vcpu::new(id, fd))
    }
}
