//! virtio-net on a real TAP, in a network namespace of the fuzzing
//! process's own: fuzzer-made receive and transmit queues, frames the host
//! sends, link changes. No panic, nothing written outside the driver's
//! receive buffers and used rings, consistent used rings, used lengths
//! within the largest frame, and the device never spins (every call
//! returns).
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::virtio::net::{Net, Tap, MAX_FRAME};
use vmm_devices::virtio::{
    ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vmm_kit_fuzz::*;

const IFNAME: &str = "fz0";
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    value: i32,
    _pad: [u8; 20],
}

/// The host end: a packet socket on the TAP's interface.
struct Host {
    sock: OwnedFd,
}

fn host() -> &'static Host {
    static HOST: std::sync::OnceLock<Host> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: plain system calls on locals of the sizes given; the
        // namespace change affects this (single-threaded) process only.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNET),
                0,
                "the virtio_net target needs CAP_SYS_ADMIN (root) for a network namespace"
            );
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let tap = Tap::open(IFNAME).expect("a TAP");
            assert!(libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) >= 0);
            let ctl = OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0));
            let mut r = IfReq {
                name: [0; 16],
                value: 9000,
                _pad: [0; 20],
            };
            r.name[..IFNAME.len()].copy_from_slice(IFNAME.as_bytes());
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFMTU, &mut r);
            r.value = libc::IFF_UP | libc::IFF_NOARP;
            assert!(libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r) >= 0);
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let s = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(proto),
            );
            assert!(s >= 0);
            let sock = OwnedFd::from_raw_fd(s);
            let name = std::ffi::CString::new(IFNAME).expect("name");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert_eq!(
                libc::bind(
                    sock.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32
                ),
                0
            );
            drop(tap);
            Host { sock }
        }
    })
}

impl Host {
    fn send(&self, frame: &[u8]) {
        // SAFETY: a local buffer of its length.
        unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }

    /// Takes whatever the guest sent (so the next run starts clean).
    fn drain(&self) {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: a local buffer of its length; the socket does not block.
        while unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) }
            > 0
        {}
    }
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
        host.send(f);
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
    host.drain();
});
