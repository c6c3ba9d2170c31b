//! virtio-vsock against real Unix sockets: fuzzer-made receive, transmit
//! and event queues, a host program that connects with a fuzzer-made
//! `CONNECT` line and data, and a host service the guest may reach. No
//! panic, nothing written outside the driver's receive and event buffers
//! and used rings, consistent used rings, and the socket file gone with
//! the device.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_devices::virtio::vsock::Vsock;
use vmm_devices::virtio::{
    ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vmm_kit_fuzz::*;

fn dir() -> &'static PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vmm-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("socket directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let cfg = byte(&mut u);
    let rx = QueueScenario::decode(&mut u);
    let tx = QueueScenario::decode(&mut u);
    let ev = QueueScenario::decode(&mut u);
    let hello_len = usize::from(byte(&mut u) % 48);
    let hello = u.bytes(hello_len).map(<[u8]>::to_vec).unwrap_or_default();
    let host_len = usize::from(byte(&mut u));
    let host_data = u.bytes(host_len).map(<[u8]>::to_vec).unwrap_or_default();
    let steps = u.bytes(8).map(<[u8]>::to_vec).unwrap_or_default();

    let mem = memory();
    rx.write(&mem, 0);
    tx.write(&mem, 1);
    ev.write(&mem, 2);
    let allowed: Vec<_> = (0..3)
        .map(|i| writable_ranges(&mem, i, [&rx, &tx, &ev][i].size()))
        .collect();
    let before = snapshot(&mem);

    let path = dir().join("v.sock");
    let _ = std::fs::remove_file(&path);
    let service = UnixListener::bind(format!("{}_52", path.display()));
    let mut dev: Vsock<GuestMemoryMmap> = Vsock::new(3, path.clone()).expect("vsock");
    if cfg & 2 != 0 {
        // As after a restore: a transport reset event is owed.
        let st = dev.save_device_state();
        dev.restore_device_state(st.as_ref()).expect("own state");
    }
    let event_idx = cfg & 1 != 0;
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![
            rx.queue(0, event_idx),
            tx.queue(1, event_idx),
            ev.queue(2, event_idx),
        ],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: VIRTIO_F_VERSION_1
            | if event_idx {
                VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            },
    };
    dev.activate(ctx).expect("activate");
    let mut client = UnixStream::connect(&path).ok();
    if let Some(c) = client.as_mut() {
        let _ = c.set_nonblocking(true);
        let _ = c.write(&hello);
        let _ = c.write(&host_data);
    }
    for s in steps {
        match s % 4 {
            0 => dev.process_event(0),
            1 => {
                dev.process_queue(1);
            }
            2 => {
                dev.process_queue(usize::from(s >> 6) % 3);
            }
            _ => {
                if s & 0x80 != 0 {
                    client = None;
                }
                // The kick, or the connection timer (early: nothing is due).
                dev.process_event(if s & 0x40 != 0 { 2 } else { 1 });
            }
        }
    }
    if allowed.iter().all(Option::is_some) {
        let all: Vec<_> = allowed.iter().flatten().flatten().copied().collect();
        assert_writes_inside(&before, &mem, &all);
    }
    let strict = allowed.iter().all(Option::is_some);
    assert_used_ring(&mem, &rx, 0, strict);
    assert_used_ring(&mem, &tx, 1, strict);
    assert_used_ring(&mem, &ev, 2, strict);
    drop(client);
    drop(service);
    drop(dev);
    assert!(!path.exists(), "the device removes its socket");
    let _ = std::fs::remove_file(format!("{}_52", path.display()));
});
