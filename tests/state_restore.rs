//! vCPU and VM state of a real guest: saved, sent through serde, restored
//! into a fresh VM and saved again, the same; bad states refused.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use vmm_kit::kvm_bindings;

use common::{require_kvm, SharedBuf};
use vmm_kit::core::{
    HostIo, KernelSource, StoppedVm, VcpuError, VcpuState, Vm, VmConfig, VmError, VmState, Vmm,
};
use vmm_kit::memory::{create_guest_ram, AddressMap, RamBacking};

/// MSRs that move on their own between a save and the next (time stamps).
const MOVING_MSRS: [u32; 2] = [0x10, 0x6e0];

/// Boots the spinning guest, stops it and hands back the stopped VM.
fn stopped_guest() -> StoppedVm {
    require_kvm();
    let out = SharedBuf::default();
    let config = VmConfig {
        kernel: KernelSource::Bytes(vmm_kit::testguest::IMAGE),
        cmdline: "testguest.run=spin".into(),
        mem_mib: 64,
        ..VmConfig::default()
    };
    let vmm = Vmm::new(&config, HostIo::serial(Box::new(out.clone()))).expect("build");
    let handle = vmm.handle();
    let running = vmm.start().expect("start");
    out.wait_for("testguest: spin", Duration::from_secs(30));
    handle.stop();
    running.wait_and_keep().expect("run").1
}

fn fresh_vm() -> Vm {
    let map = AddressMap::new(64 << 20).expect("map");
    Vm::new(create_guest_ram(&map, RamBacking::Anonymous).expect("ram")).expect("vm")
}

fn msr_map(s: &VcpuState) -> BTreeMap<u32, u64> {
    s.msrs
        .iter()
        .filter(|m| !MOVING_MSRS.contains(&m.index))
        .map(|m| (m.index, m.data))
        .collect()
}

#[test]
fn vcpu_and_vm_state_survive_serde_and_a_fresh_vm() {
    let stopped = stopped_guest();
    let vcpu_state = stopped.vcpus[0]
        .save_state(stopped.vm.kvm())
        .expect("save vCPU");
    let vm_state = stopped.vm.save_state().expect("save VM");
    assert_eq!(vcpu_state.sregs.cs.selector & 3, 3, "saved at CPL3");
    assert!(vcpu_state.msrs.len() > 10, "{} MSRs", vcpu_state.msrs.len());

    let json = serde_json::to_string(&(&vcpu_state, &vm_state)).expect("to json");
    let (vcpu_back, vm_back): (VcpuState, VmState) =
        serde_json::from_str(&json).expect("from json");
    assert_eq!(vcpu_back, vcpu_state, "serde keeps every field");

    let vm = fresh_vm();
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    vm.restore_state(&vm_back).expect("restore VM");
    vcpu.restore_state(&vcpu_back).expect("restore vCPU");
    let again = vcpu.save_state(vm.kvm()).expect("save again");
    assert_eq!(again.regs, vcpu_state.regs);
    assert_eq!(again.sregs, vcpu_state.sregs);
    assert_eq!(again.xsave, vcpu_state.xsave);
    assert_eq!(again.xcrs, vcpu_state.xcrs);
    assert_eq!(again.debugregs, vcpu_state.debugregs);
    assert_eq!(again.mp_state, vcpu_state.mp_state);
    assert_eq!(again.cpuid, vcpu_state.cpuid);
    assert_eq!(
        again.lapic.regs[0x20..0x24],
        vcpu_state.lapic.regs[0x20..0x24],
        "APIC ID"
    );
    assert_eq!(msr_map(&again), msr_map(&vcpu_state));
    let vm_again = vm.save_state().expect("save VM again");
    assert_eq!(vm_again.ioapic.chip_id, vm_state.ioapic.chip_id);
    // SAFETY: reading the IOAPIC member of the union `get_irqchip` filled
    // for chip KVM_IRQCHIP_IOAPIC.
    let (a, b) = unsafe { (vm_again.ioapic.chip.ioapic, vm_state.ioapic.chip.ioapic) };
    // SAFETY: every redirection entry is a plain 64-bit word (`bits`)
    // viewed through a union of bit fields.
    let bits = |t: [kvm_bindings::kvm_ioapic_state__bindgen_ty_1; 24]| t.map(|r| unsafe { r.bits });
    assert_eq!(bits(a.redirtbl), bits(b.redirtbl));
    assert!(
        vm_again.clock.clock >= vm_state.clock.clock,
        "guest time goes on from the saved time"
    );
}

#[test]
fn states_that_do_not_fit_are_refused_before_kvm_sees_them() {
    let stopped = stopped_guest();
    let state = stopped.vcpus[0].save_state(stopped.vm.kvm()).expect("save");
    let vm = fresh_vm();
    let vcpu1 = vm.create_vcpu(1).expect("vcpu 1");
    assert!(matches!(
        vcpu1.restore_state(&state),
        Err(VcpuError::BadState {
            what: "vCPU index",
            ..
        })
    ));
    let vcpu0 = vm.create_vcpu(0).expect("vcpu 0");
    let mut short = state.clone();
    short.xsave.truncate(10);
    assert!(matches!(
        vcpu0.restore_state(&short),
        Err(VcpuError::BadState { .. })
    ));
    let mut many = state.clone();
    many.msrs = vec![many.msrs[0]; 5000];
    assert!(matches!(
        vcpu0.restore_state(&many),
        Err(VcpuError::BadState { .. })
    ));
    let mut mp = state;
    mp.mp_state.mp_state = 77;
    assert!(matches!(
        vcpu0.restore_state(&mp),
        Err(VcpuError::BadState { .. })
    ));

    let mut vm_state = stopped.vm.save_state().expect("save VM");
    std::mem::swap(&mut vm_state.pic_master, &mut vm_state.ioapic);
    assert!(matches!(
        vm.restore_state(&vm_state),
        Err(VmError::BadState { .. })
    ));
}
