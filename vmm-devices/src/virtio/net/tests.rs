//! virtio-net against a real TAP, in a network namespace of the test's own
//! thread (made with `unshare`, gone with the thread): an `AF_PACKET` socket
//! on the TAP's interface stands for the host network, seeing what the
//! guest sends and sending what the guest receives.

use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{EV_RX_LIMITER, EV_TAP, EV_TX_LIMITER};
use super::*;
use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::test_utils::{context, memory, Buf, Driver, HostLink, TestInterrupt};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUF: u64 = 0x80_0000;
const BUF: u32 = 2048;
/// An ethertype for local experiments: the frames of these tests.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 2];

/// Runs `f` on a thread in a network namespace of its own.
fn in_netns<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare with a flag, no pointers; affects this thread.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "virtio-net tests need CAP_SYS_ADMIN for a network namespace: {}",
                std::io::Error::last_os_error()
            );
            // No IPv6 chatter (router solicitations, MLD) on the TAP.
            for conf in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                    .expect("IPv6 off in the test namespace");
            }
            f()
        })
        .join()
        .expect("test thread")
    })
}

/// The host side of the TAP: the interface up with `mtu`, and a packet
/// socket on it.
struct Host {
    link: HostLink,
}

impl Host {
    fn new(ifname: &str, mtu: i32) -> Self {
        let link = HostLink::up(ifname, mtu).expect("the TAP's interface up");
        link.set_recv_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("a receive timeout");
        Self { link }
    }

    /// Sends a test frame of `len` bytes (with `tag` in its payload) to
    /// the guest.
    fn send(&self, len: usize, tag: u8) -> Vec<u8> {
        let f = frame(len, tag);
        assert_eq!(self.link.send(&f).expect("send a frame"), f.len());
        f
    }

    /// The next test frame the guest sent, if one comes within 200 ms.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        loop {
            let n = self.link.recv(&mut buf).ok()?;
            let f = &buf[..n];
            if f.len() >= 14 && f[12..14] == ETHERTYPE {
                return Some(f.to_vec());
            }
        }
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&[0x06, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&ETHERTYPE);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = tag.wrapping_add(i as u8);
    }
    f
}

struct Setup<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Net<GuestMemoryMmap>,
    rx: Driver<'a>,
    tx: Driver<'a>,
    intr: Arc<TestInterrupt>,
    host: Host,
}

const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF);

fn setup(mem: &GuestMemoryMmap, features: u64, mtu: i32) -> Setup<'_> {
    let tap = Tap::open("vt0").expect("a TAP in the test namespace");
    let host = Host::new("vt0", mtu);
    let mut dev = Net::new(tap, Some(MacAddr(GUEST_MAC))).unwrap();
    let rx = Driver::new(mem, RXQ, 64);
    let tx = Driver::new(mem, TXQ, 16);
    let (ctx, intr) = context(mem, vec![rx.queue(), tx.queue()], features);
    dev.activate(ctx).unwrap();
    Setup {
        mem,
        dev,
        rx,
        tx,
        intr,
        host,
    }
}

impl Setup<'_> {
    /// Posts `n` receive buffers of `len` bytes, from buffer slot `first`.
    fn post(&mut self, first: u64, n: u64, len: u32) {
        for i in first..first + n {
            self.rx.add(&[Buf(RX_BUFS + i * u64::from(BUF), len, true)]);
        }
    }

    /// The frame in used receive entry `i`: (header's num_buffers, bytes
    /// across its buffers).
    fn received(&self, i: u16) -> (u16, Vec<u8>) {
        let (head, len) = self.rx.used(i);
        let addr = RX_BUFS + u64::from(head) * u64::from(BUF);
        let nbuf: u16 = self.mem.read_obj(GuestAddress(addr + 10)).unwrap();
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        for k in 1..nbuf {
            let (head, len) = self.rx.used(i + k);
            let addr = RX_BUFS + u64::from(head) * u64::from(BUF);
            let mut more = vec![0u8; len as usize];
            self.mem.read_slice(&mut more, GuestAddress(addr)).unwrap();
            out.extend(more);
        }
        (nbuf, out[VNET_HDR_LEN..].to_vec())
    }

    /// Sends `frame` from the guest as a chain of pieces of `split` bytes.
    fn transmit(&mut self, frame: &[u8], split: usize) {
        let mut data = vec![0u8; VNET_HDR_LEN];
        data.extend_from_slice(frame);
        self.mem.write_slice(&data, GuestAddress(TX_BUF)).unwrap();
        let bufs: Vec<Buf> = (0..data.len())
            .step_by(split)
            .map(|o| Buf(TX_BUF + o as u64, split.min(data.len() - o) as u32, false))
            .collect();
        self.tx.add(&bufs);
        self.dev.process_queue(1);
    }
}

#[test]
fn frames_from_the_guest_reach_the_host_whole() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 1500);
        for (len, split) in [(60, 4096), (1514, 4096), (1514, 100), (64, 7)] {
            let f = frame(len, len as u8);
            s.transmit(&f, split);
            assert_eq!(
                s.host.recv().as_deref(),
                Some(&f[..]),
                "{len} bytes in {split}-byte pieces"
            );
        }
        assert_eq!(s.tx.used_idx(), 4);
        let m = s.dev.metrics();
        assert_eq!(m.tx_packets_count.get(), 4);
        assert_eq!(m.tx_bytes_count.get(), 60 + 1514 + 1514 + 64);
    });
}

#[test]
fn frames_for_the_guest_land_in_its_buffers_without_a_copy() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 9000);
        // 40 buffers of 2 KiB: room for the largest frame.
        s.post(0, 40, BUF);
        let small = s.host.send(100, 1);
        let big = s.host.send(5000, 2);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.received(0), (1, small));
        assert_eq!(s.received(1), (3, big), "merged across three buffers");
        assert_eq!(s.rx.used_idx(), 4);
        let m = s.dev.metrics();
        assert_eq!(m.rx_packets_count.get(), 2);
        assert_eq!(m.rx_bounced.get(), 0, "read straight into guest memory");
        assert!(s.intr.used_count() >= 1);
        // The unused buffers are still the guest's: the next frame takes
        // the next one.
        let next = s.host.send(200, 3);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.received(4), (1, next));
    });
}

#[test]
fn a_frame_waits_for_room_instead_of_being_dropped() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 9000);
        let f = s.host.send(3000, 7);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.rx.used_idx(), 0, "no buffers yet");
        assert_eq!(s.dev.metrics().rx_no_buffers.get(), 1);
        // One buffer is not enough for 3000 bytes: the frame is held.
        s.post(0, 1, BUF);
        s.dev.process_queue(0);
        assert_eq!(s.rx.used_idx(), 0, "held until it fits");
        s.post(1, 1, BUF);
        s.dev.process_queue(0);
        assert_eq!(s.received(0), (2, f));
        assert_eq!(s.dev.metrics().rx_bounced.get(), 1);
    });
}

#[test]
fn link_down_stops_both_directions_and_up_resumes() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES | (1 << VIRTIO_NET_F_STATUS), 1500);
        let mut status = [0u8; 2];
        s.dev.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
        s.dev.set_link(false);
        assert_eq!(s.intr.config.load(std::sync::atomic::Ordering::SeqCst), 1);
        s.dev.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 0);
        s.transmit(&frame(60, 0), 4096);
        assert_eq!(s.host.recv(), None, "dropped while down");
        assert_eq!(s.dev.metrics().tx_dropped_link_down.get(), 1);
        s.post(0, 40, BUF);
        let f = s.host.send(80, 9);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.rx.used_idx(), 0, "nothing received while down");
        s.dev.set_link(true);
        s.dev.process_event(super::device::EV_KICK);
        assert_eq!(s.received(0), (1, f));
    });
}

#[test]
fn hostile_chains_are_dropped_or_refused_and_the_device_goes_on() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 1500);
        // Shorter than a header, and longer than the largest frame.
        s.tx.add(&[Buf(TX_BUF, 4, false)]);
        s.tx.add(&[Buf(TX_BUF, MAX_FRAME as u32 + 1, false)]);
        // A header the TAP refuses: an unknown GSO type.
        let mut bad = vec![0u8; VNET_HDR_LEN + 60];
        bad[1] = 0x7f;
        mem.write_slice(&bad, GuestAddress(TX_BUF + 0x10_0000))
            .unwrap();
        s.tx.add(&[Buf(TX_BUF + 0x10_0000, bad.len() as u32, false)]);
        s.dev.process_queue(1);
        assert_eq!(s.tx.used_idx(), 3, "every chain is given back");
        let m = s.dev.metrics();
        assert_eq!(m.tx_malformed_frames.get(), 2);
        assert_eq!(m.tap_write_fails.get(), 1);
        assert!(!s.intr.needs_reset());
        // Receive buffers too small for a header are given back empty.
        s.rx.add(&[Buf(RX_BUFS, 4, true)]);
        s.post(1, 40, BUF);
        let f = s.host.send(60, 1);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.rx.used(0).1, 0);
        assert_eq!(s.received(1), (1, f));
        assert_eq!(m.rx_bad_buffers.get(), 1);
        // Still sends good frames.
        let g = frame(60, 3);
        s.transmit(&g, 4096);
        assert_eq!(s.host.recv(), Some(g));
        // A buffer outside guest memory breaks the ring.
        s.tx.add(&[Buf(0xffff_0000, 100, false)]);
        s.dev.process_queue(1);
        assert!(s.intr.needs_reset());
    });
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_a_buffer_is_dropped() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, VIRTIO_F_VERSION_1, 9000);
        s.post(0, 2, BUF);
        s.host.send(3000, 1);
        let f = s.host.send(500, 2);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.dev.metrics().rx_dropped_too_big.get(), 1);
        assert_eq!(s.rx.used_idx(), 1);
        assert_eq!(s.received(0), (1, f));
    });
}

fn wait_readable(fd: i32) {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 2000) };
    assert_eq!(n, 1, "the limiter's timer fires");
}

#[test]
fn rate_limiters_hold_frames_until_their_timer_fires() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 1500);
        let two_per_50ms = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: None,
                refill_time: 50,
            }),
        };
        s.dev
            .set_rate_limiters(Some(&two_per_50ms), Some(&two_per_50ms))
            .unwrap();
        for i in 0..4 {
            let f = frame(60, i);
            let at = TX_BUF + u64::from(i) * 0x1000;
            let mut data = vec![0u8; VNET_HDR_LEN];
            data.extend_from_slice(&f);
            mem.write_slice(&data, GuestAddress(at)).unwrap();
            s.tx.add(&[Buf(at, data.len() as u32, false)]);
        }
        s.dev.process_queue(1);
        assert_eq!(s.tx.used_idx(), 2, "two frames, then the limiter");
        assert_eq!(s.dev.metrics().tx_rate_limiter_throttled.get(), 1);
        let fds = s.dev.event_fds();
        for _ in 0..4 {
            if s.tx.used_idx() == 4 {
                break;
            }
            wait_readable(fds[EV_TX_LIMITER]);
            s.dev.process_event(EV_TX_LIMITER);
        }
        assert_eq!(s.tx.used_idx(), 4, "the rest after the timer");
        for i in 0..4 {
            assert_eq!(s.host.recv(), Some(frame(60, i)));
        }
        // Receive: frames are read, then the limiter stops the reading.
        s.post(0, 40, BUF);
        for i in 0..4 {
            s.host.send(60, i);
        }
        s.dev.process_event(EV_TAP);
        let m = s.dev.metrics();
        assert_eq!(
            s.rx.used_idx(),
            2,
            "throttled {} packets {} nobuf {}",
            m.rx_rate_limiter_throttled.get(),
            m.rx_packets_count.get(),
            m.rx_no_buffers.get()
        );
        for _ in 0..4 {
            if s.rx.used_idx() == 4 {
                break;
            }
            wait_readable(fds[EV_RX_LIMITER]);
            s.dev.process_event(EV_RX_LIMITER);
        }
        assert_eq!(s.rx.used_idx(), 4, "the rest after the timer");
        assert_eq!(s.received(3), (1, frame(60, 3)));
    });
}

#[test]
fn offloads_follow_the_features_the_driver_took() {
    in_netns(|| {
        let mem = memory();
        let all = FEATURES
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN);
        // Activation sets them on the TAP (the kernel checks the set).
        let s = setup(&mem, all, 1500);
        assert!(s.dev.is_active());
        // Inconsistent sets are narrowed, not refused.
        let tap = Tap::open("vt1").unwrap();
        let mut d: Net<GuestMemoryMmap> = Net::new(tap, None).unwrap();
        let rx = Driver::new(&mem, RXQ, 64);
        let tx = Driver::new(&mem, TXQ, 16);
        let (ctx, _) = context(
            &mem,
            vec![rx.queue(), tx.queue()],
            FEATURES | (1 << VIRTIO_NET_F_GUEST_TSO4),
        );
        d.activate(ctx).unwrap();
        assert_eq!(
            d.device_features() & (1 << VIRTIO_NET_F_MAC),
            0,
            "no MAC offered when none is set"
        );
    });
}

#[test]
fn saved_state_round_trips_and_a_different_mac_is_refused() {
    in_netns(|| {
        let tap = Tap::open("vt0").unwrap();
        let mut a: Net<GuestMemoryMmap> = Net::new(tap, Some(MacAddr(GUEST_MAC))).unwrap();
        a.set_link(false);
        let st = a.save_device_state();
        let tap = Tap::open("vt1").unwrap();
        let mut b: Net<GuestMemoryMmap> = Net::new(tap, Some(MacAddr(GUEST_MAC))).unwrap();
        b.restore_device_state(st.as_ref()).unwrap();
        assert!(!b.link_up());
        let tap = Tap::open("vt2").unwrap();
        let mut c: Net<GuestMemoryMmap> = Net::new(tap, None).unwrap();
        assert!(c.restore_device_state(st.as_ref()).is_err());
        assert!(c.restore_device_state(None).is_err());
    });
}

#[test]
fn mac_addresses_parse_print_and_refuse_multicast() {
    let m: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
    assert_eq!(m.to_string(), "06:00:ac:10:00:02");
    assert_eq!(serde_json::to_string(&m).unwrap(), "\"06:00:ac:10:00:02\"");
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "6:00:ac:10:00:02",
        "zz:00:ac:10:00:02",
    ] {
        assert!(
            matches!(bad.parse::<MacAddr>(), Err(MacAddrError::Syntax(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        "01:00:5e:00:00:01".parse::<MacAddr>(),
        Err(MacAddrError::Multicast(_))
    ));
}

#[test]
fn a_frame_past_the_mtu_seen_at_start_is_dropped_once_then_expected() {
    in_netns(|| {
        let mem = memory();
        let mut s = setup(&mem, FEATURES, 1500);
        s.post(0, 40, BUF);
        let small = s.host.send(1514, 1);
        s.dev.process_event(EV_TAP);
        assert_eq!(
            s.received(0),
            (1, small),
            "an MTU-sized frame fits one buffer"
        );
        // The host raises the MTU while the guest runs.
        HostLink::set_mtu("vt0", 9000).expect("a larger MTU");
        s.host.send(3000, 2);
        s.dev.process_event(EV_TAP);
        let m = s.dev.metrics();
        assert_eq!(
            m.rx_truncated.get(),
            1,
            "fails {} used {} bounced {}",
            m.tap_read_fails.get(),
            s.rx.used_idx(),
            m.rx_bounced.get()
        );
        assert_eq!(s.rx.used_idx(), 1, "the cut frame is not delivered");
        let big = s.host.send(3000, 3);
        s.dev.process_event(EV_TAP);
        assert_eq!(s.received(1), (2, big), "the next one is");
    });
}
