//! The snapshot state decoder under any file: a corrupted, truncated,
//! foreign or hostile state file is an error, never a panic or an
//! allocation beyond the bound. Bytes that pass are checked the way a
//! restore checks them (a vCPU's, a VM's and a whole snapshot's state
//! validated, the last with the invariants a restore relies on), and a state
//! that decodes encodes and decodes again. The input is tried both as a
//! whole file and as a payload under a correct header, so the fuzzer gets
//! past the checksum to the JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_core::snapshot::{
    decode, encode, SnapshotState, StateFileError, HEADER_BYTES, MAX_STATE_BYTES,
};
use vmm_core::{VcpuState, VmState};

fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(b"VMMKSNAP");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn check(bytes: &[u8]) {
    match decode::<serde_json::Value>(bytes) {
        Ok(v) => {
            // (Values, not bytes, are compared by the unit tests: JSON
            // floats need not survive a round trip exactly.)
            let again = encode(&v).expect("a decoded state encodes");
            decode::<serde_json::Value>(&again).expect("and decodes again");
        }
        Err(StateFileError::TooLarge(n)) => assert!(n > MAX_STATE_BYTES),
        Err(_) => {}
    }
    if let Ok(s) = decode::<VcpuState>(bytes) {
        let _ = s.validate(0);
    }
    if let Ok(s) = decode::<VmState>(bytes) {
        let _ = s.validate();
    }
    if let Ok(s) = decode::<SnapshotState>(bytes) {
        // A whole state that passes holds together the way a restore
        // relies on before it builds anything.
        if s.validate().is_ok() {
            assert_eq!(s.vcpus.len(), usize::from(s.machine.vcpus));
            assert_eq!(s.memory.size_bytes, s.machine.mem_mib << 20);
            assert!(s.memory.layers >= 1);
            assert!(
                s.virtio.len()
                    >= s.machine.disks.len()
                        + usize::from(s.machine.rng)
                        + usize::from(s.machine.console)
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&wrap(data));
});
