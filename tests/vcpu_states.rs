//! The vCPU thread's state machine on a real guest: pause, resume, exit, and
//! the vCPU handed back for inspection.

mod common;

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{require_kvm, SharedBuf};
use vmm_kit::boot::{boot_guest, BootConfig, ProtocolChoice};
use vmm_kit::core::seccomp::{program, ThreadKind};
use vmm_kit::core::vcpu::{VcpuCommand, VcpuHandle, VcpuRunState};
use vmm_kit::core::{StopReason, Vm, VmEvent, VmEventSender};
use vmm_kit::devices::legacy::{Serial, COM1_PORT, COM1_PORT_SIZE};
use vmm_kit::devices::EventFdTrigger;
use vmm_kit::memory::{create_guest_ram, AddressMap, RamBacking};
use vmm_kit::vm_device::bus::{PioAddress, PioRange};
use vmm_kit::vm_device::device_manager::{IoManager, PioManager};

#[test]
fn vcpu_pauses_resumes_and_exits_on_command_and_returns_its_state() {
    require_kvm();
    let map = AddressMap::new(64 << 20).expect("map");
    let mem = create_guest_ram(&map, RamBacking::Anonymous).expect("ram");
    let config = BootConfig {
        protocol: ProtocolChoice::Auto,
        cmdline: "testguest.run=spin",
        acpi_rsdp: None,
    };
    let setup = boot_guest(
        &mem,
        &map,
        &mut Cursor::new(vmm_kit::testguest::IMAGE),
        None::<&mut Cursor<&[u8]>>,
        &config,
    )
    .expect("boot setup");
    let vm = Vm::new(mem.clone()).expect("vm");
    let out = SharedBuf::default();
    let serial = Arc::new(Mutex::new(Serial::new(
        EventFdTrigger::new().expect("eventfd"),
        out.clone(),
    )));
    let mut bus = IoManager::new();
    bus.register_pio(
        PioRange::new(PioAddress(COM1_PORT), COM1_PORT_SIZE).expect("range"),
        serial,
    )
    .expect("register");
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    vcpu.configure(vm.kvm(), 1, Some(&setup.cpu))
        .expect("configure");

    let (events, rx) = VmEventSender::channel();
    let handle = VcpuHandle::spawn(
        vcpu,
        Arc::new(bus),
        mem,
        events,
        // Under its seccomp filter, as in the VMM.
        Some(program(ThreadKind::Vcpu).expect("filter")),
    )
    .expect("spawn");

    out.wait_for("testguest: spin", Duration::from_secs(30));
    let timeout = Duration::from_secs(10);
    handle.send(VcpuCommand::Pause);
    assert_eq!(
        handle.wait_for(|s| s != VcpuRunState::Running, timeout),
        Some(VcpuRunState::Paused)
    );
    handle.send(VcpuCommand::Resume);
    assert_eq!(
        handle.wait_for(|s| s != VcpuRunState::Paused, timeout),
        Some(VcpuRunState::Running)
    );
    assert!(rx.try_recv().is_err(), "pausing is not an end");

    let vcpu = handle.join(timeout).expect("vCPU handed back");
    assert_eq!(handle.state(), VcpuRunState::Exited);
    assert!(matches!(
        rx.recv_timeout(timeout),
        Ok(VmEvent::VcpuStopped {
            id: 0,
            result: Ok(StopReason::Requested)
        })
    ));
    // The guest was stopped in its CPL3 spin loop, inside the image.
    let regs = vcpu.fd().get_regs().expect("regs");
    let sregs = vcpu.fd().get_sregs().expect("sregs");
    assert_eq!(sregs.cs.selector & 3, 3, "stopped at CPL3");
    let image = setup.kernel.load_range.expect("load range");
    assert!(
        image.contains(regs.rip),
        "rip {:#x} outside the image {image:x?}",
        regs.rip
    );
}
