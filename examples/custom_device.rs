//! A VMM with two devices of its own, a virtio device and a port device,
//! beside the built-in ones. It boots the test guest, which pokes the port
//! and sends the virtio device a request, then checks both were used.
//! `cargo run --example custom_device`

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vmm_kit::core::{HostIo, KernelSource, VmBuilder, VmExit};
use vmm_kit::devices::virtio::{VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_kit::memory::{GuestRam, RamBacking};
use vmm_kit::vm_device::bus::{PioAddress, PioAddressOffset};
use vmm_kit::vm_device::MutDevicePio;

/// Our virtio device type (pick one no standard device uses).
const TYPE_UPPER: u32 = 0x4242;
/// Our port.
const SCRATCH_PORT: u16 = 0x510;

/// A virtio device with one queue: it answers each request (a readable
/// buffer, then a writable one) with the same bytes in upper case.
struct Upper {
    common: VirtioCommon<GuestRam>,
    requests: u64,
}

impl VirtioDevice<GuestRam> for Upper {
    fn common(&self) -> &VirtioCommon<GuestRam> {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon<GuestRam> {
        &mut self.common
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_queue(&mut self, index: usize) -> bool {
        let requests = &mut self.requests;
        // Every length and address is the guest's: the Reader and Writer check them.
        let done = self.common.drain(index, "upper", |mem, chain| {
            let (mut r, mut w) = (chain.clone().reader(mem).ok()?, chain.writer(mem).ok()?);
            let mut buf = vec![0; r.available_bytes().min(w.available_bytes()).min(4096)];
            r.read_exact(&mut buf).ok()?;
            buf.make_ascii_uppercase();
            *requests += 1;
            w.write_all(&buf).ok()?;
            Some(buf.len() as u32)
        });
        done.more
    }
}

/// A port device: remembers the last byte written and how many writes.
#[derive(Default)]
struct Scratch {
    value: u8,
    writes: u32,
}

impl MutDevicePio for Scratch {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(self.value);
    }
    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, data: &[u8]) {
        self.value = data.first().copied().unwrap_or(0);
        self.writes += 1;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut vm = VmBuilder::new(64, RamBacking::Anonymous)?;
    vm.kernel(KernelSource::Bytes(vmm_kit::testguest::IMAGE))
        .cmdline("testguest.run=pio,virtio,exit testguest.exit=0 testguest.pio=w1@0x510=0x2a,r1@0x510 testguest.virtio=0x4242:0:68656c6c6f:16")
        .host_io(HostIo::serial(Box::new(std::io::stdout())));
    let upper = vm.add_virtio(Upper {
        common: VirtioCommon::new(TYPE_UPPER, VIRTIO_F_VERSION_1, &[16]),
        requests: 0,
    })?;
    let scratch = Arc::new(Mutex::new(Scratch::default()));
    vm.add_pio_device("scratch", SCRATCH_PORT, 1, scratch.clone())?;

    let exit = vm.build()?.run()?;
    let requests = upper.with(|d| d.requests).unwrap_or(0);
    let port = scratch.lock().map_err(|_| "poisoned")?;
    println!(
        "guest ended: {exit:?}; virtio requests: {requests}; port writes: {}",
        port.writes
    );
    if exit != VmExit::GuestStatus(0) || requests != 1 || (port.value, port.writes) != (0x2a, 1) {
        return Err("the guest did not use both devices".into());
    }
    Ok(())
}
