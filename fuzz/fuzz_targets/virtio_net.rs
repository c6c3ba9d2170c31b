//! virtio-net on a real TAP, in a network namespace of the fuzzing
//! process's own: fuzzer-made receive and transmit queues, frames the host
//! sends, link changes. No panic, nothing written outside the driver's
//! receive buffers and used rings, consistent used rings, used lengths
//! within the largest frame, and the device never spins (every call
//! returns).
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::Arc;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::test_utils::HostLink;
use vmm_devices::virtio::net::{Net, Tap, MAX_FRAME};
use vmm_devices::virtio::{
    ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vmm_kit_fuzz::*;

const IFNAME: &str = "fz0";
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// The host end, in a network namespace of this process's own: the TAP
/// made persistent (each run attaches a new device to it), up, and a
/// packet socket on it that never blocks.
fn host() -> &'static HostLink {
    static HOST: std::sync::OnceLock<HostLink> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: unshare with a flag, no pointers; it affects this
        // (single-threaded) process only.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r, 0,
            "the virtio_net target needs CAP_SYS_ADMIN (root) for a network namespace"
        );
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let tap = Tap::open(IFNAME).expect("a TAP");
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
        assert!(r >= 0, "persistent TAP");
        let link = HostLink::up(IFNAME, 9000).expect("the TAP up");
        link.set_recv_timeout(None).expect("non-blocking");
        drop(tap);
        link
    })
}

/// Takes whatever the guest sent (so the next run starts clean).
fn drain(host: &HostLink) {
    let mut buf = vec![0u8; 70_000];
    while host.recv(&mut buf).is_ok() {}
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let mut u = Unstructured::new(data);
    let cfg = byte(&mut u);
    let mut features = VIRTIO_F_VERSION_1;
    for (bit, f) in [
        (1u8, VIRTIO_RING_F_EVENT_IDX),
        (2, 1 << 15),
        (4, 1 << 1),
        (8, (1 << 1) | (1 << 7) | (1 << 8)),
    ] {
        if cfg & bit != 0 {
            features |= f;
        }
    }
    let rx = QueueScenario::decode(&mut u);
    let tx = QueueScenario::decode(&mut u);
    let nframes = usize::from(byte(&mut u) % 8);
    let frames: Vec<Vec<u8>> = (0..nframes)
        .map(|_| {
            let len = 14 + usize::from(word(&mut u)) % 9000;
            let mut f = vec![0u8; len];
            f[..6].copy_from_slice(&[0x06, 0, 0, 0, 0, 2]);
            f[12] = 0x88;
            f[13] = 0xb5;
            let fill = u.bytes(len.min(64)).map(<[u8]>::to_vec).unwrap_or_default();
            f[14..14 + fill.len().min(len - 14)].copy_from_slice(&fill[..fill.len().min(len - 14)]);
            f
        })
        .collect();
    let steps = u.bytes(8).map(<[u8]>::to_vec).unwrap_or_default();

    let mem = memory();
    rx.write(&mem, 0);
    tx.write(&mem, 1);
    let allowed_rx = writable_ranges(&mem, 0, rx.size());
    let allowed_tx = writable_ranges(&mem, 1, tx.size());
    let before = snapshot(&mem);

    let tap = Tap::open(IFNAME).expect("reattach the TAP");
    let mut dev: Net<GuestMemoryMmap> = Net::new(tap, None).expect("net");
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![rx.queue(0, cfg & 1 != 0), tx.queue(1, cfg & 1 != 0)],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: features,
    };
    dev.activate(ctx).expect("activate");
    for f in &frames {
        let _ = host.send(f);
    }
    for s in steps {
        match s % 5 {
            0 => dev.process_event(0),
            1 => {
                dev.process_queue(1);
            }
            2 => {
                dev.process_queue(0);
            }
            3 => dev.set_link(s & 0x80 == 0),
            _ => dev.process_event(3),
        }
    }
    dev.process_event(0);
    let strict = allowed_rx.is_some() && allowed_tx.is_some();
    if let (Some(a), Some(b)) = (allowed_rx, allowed_tx) {
        // The device writes received frames, never transmit buffers.
        let (_, _, tx_used) = QueueScenario::rings(1);
        let both: Vec<_> = a
            .into_iter()
            .chain(b.into_iter().filter(|&(lo, _)| lo == tx_used))
            .collect();
        assert_writes_inside(&before, &mem, &both);
    }
    assert_used_ring(&mem, &rx, 0, strict);
    assert_used_ring(&mem, &tx, 1, strict);
    if strict {
        let (_, _, used) = QueueScenario::rings(0);
        let n: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        for i in 0..u64::from(n.min(rx.size())) {
            let len: u32 = mem
                .read_obj(GuestAddress(used + 8 + 8 * i))
                .expect("used len");
            assert!(
                len as usize <= MAX_FRAME,
                "a used length {len} past the largest frame"
            );
        }
    }
    drop(dev);
    drain(host);
});
