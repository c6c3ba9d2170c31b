use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Le32, Le64};

use super::*;
use crate::test_utils::{context, memory, Buf, Driver, TestInterrupt};
use crate::virtio::block::{BlockState, DiscardSegment, RequestHeader};

const QUEUE: u64 = 0x1000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 64;

fn image(len: u64) -> File {
    let path = std::env::temp_dir().join(format!(
        "vmm-blk-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(len).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

struct Setup<'a> {
    mem: &'a GuestMemoryMmap,
    file: File,
    dev: Block<GuestMemoryMmap>,
    driver: Driver<'a>,
    intr: Arc<TestInterrupt>,
}

fn setup(mem: &GuestMemoryMmap, read_only: bool, event_idx: bool) -> Setup<'_> {
    let file = image(DISK_SECTORS * SECTOR_SIZE);
    let mut dev =
        Block::from_file(file.try_clone().unwrap(), read_only, Some("serial-0123")).unwrap();
    let driver = Driver::new(mem, QUEUE, 16);
    let features = VIRTIO_F_VERSION_1
        | if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
    let mut q = driver.queue();
    virtio_queue::QueueT::set_event_idx(&mut q, event_idx);
    let (ctx, intr) = context(mem, vec![q], features);
    dev.activate(ctx).unwrap();
    Setup {
        mem,
        file,
        dev,
        driver,
        intr,
    }
}

fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
    let h = RequestHeader {
        request_type: Le32::from(t),
        reserved: Le32::from(0),
        sector: Le64::from(sector),
    };
    mem.write_obj(h, GuestAddress(HDR)).unwrap();
}

impl Setup<'_> {
    /// Submits a request of type `t` with `data` bytes of data and returns
    /// (status, used length).
    fn request(&mut self, t: u32, sector: u64, data: u32, data_writable: bool) -> (u8, u32) {
        header(self.mem, t, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![Buf(HDR, 16, false)];
        if data > 0 {
            bufs.push(Buf(DATA, data, data_writable));
        }
        bufs.push(Buf(STATUS, 1, true));
        self.submit(&bufs)
    }

    fn submit(&mut self, bufs: &[Buf]) -> (u8, u32) {
        let before = self.driver.used_idx();
        self.driver.add(bufs);
        self.dev.process_queue(0);
        assert_eq!(
            self.driver.used_idx(),
            before.wrapping_add(1),
            "one used entry per chain"
        );
        let (_, len) = self.driver.used(before);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.file.read_exact_at(&mut v, offset).unwrap();
        v
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn out_then_in_round_trips_through_the_file() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 2, 1024, false), (OK, 1));
    assert_eq!(s.file_bytes(1024, 1024), pattern);
    mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 2, 1024, true), (OK, 1025));
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert!(!s.intr.needs_reset());
}

#[test]
fn large_requests_cross_the_bounce_buffer() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    let len = 300 * 1024u32;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    // Grow the 32 KiB disk to 1 MiB for this test.
    s.file.set_len(1 << 20).unwrap();
    let mut dev = Block::from_file(s.file.try_clone().unwrap(), false, None).unwrap();
    let (ctx, _) = context(&mem, vec![s.driver.queue()], VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    s.dev = dev;
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, len, false).0, OK);
    assert_eq!(s.file_bytes(0, len as usize), pattern);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_file() {
    let mem = memory();
    let mut s = setup(&mem, true, false);
    s.file.write_all_at(&[0x5a; 512], 0).unwrap();
    mem.write_slice(&[0xa5; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, 512, false), (IOERR, 1));
    assert_eq!(s.file_bytes(0, 512), vec![0x5a; 512]);
    assert_eq!(s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0, IOERR);
    assert_eq!(s.file_bytes(0, 512), vec![0x5a; 512]);
    assert_eq!(s.request(VIRTIO_BLK_T_IN, 0, 512, true).0, OK);
    let features = VirtioDevice::<GuestMemoryMmap>::device_features(&s.dev);
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn requests_beyond_capacity_or_misaligned_fail_without_touching_the_file() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    mem.write_slice(&[0xee; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 1024, false).0,
        IOERR
    );
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, u64::MAX, 512, false).0, IOERR);
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, u64::MAX / 512, 512, false).0,
        IOERR
    );
    assert_eq!(s.request(VIRTIO_BLK_T_OUT, 0, 100, false).0, IOERR);
    assert_eq!(
        s.request(VIRTIO_BLK_T_IN, DISK_SECTORS, 512, true),
        (IOERR, 1)
    );
    assert!(s
        .file_bytes(0, (DISK_SECTORS * SECTOR_SIZE) as usize)
        .iter()
        .all(|&b| b == 0));
    // The last sector itself is fine.
    assert_eq!(
        s.request(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 512, false).0,
        OK
    );
}

#[test]
fn flush_get_id_and_unknown_types() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    assert_eq!(s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false), (OK, 1));
    assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, 20, true), (OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"serial-0123");
    assert!(id[11..].iter().all(|&b| b == 0));
    // A short id buffer gets what fits.
    assert_eq!(s.request(VIRTIO_BLK_T_GET_ID, 0, 4, true), (OK, 5));
    assert_eq!(s.request(VIRTIO_BLK_T_SCSI_CMD, 0, 0, false), (UNSUPP, 1));
    assert_eq!(s.request(0xdead, 0, 0, false), (UNSUPP, 1));
}

#[test]
fn write_zeroes_zeroes_and_discard_is_accepted() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    s.file.write_all_at(&[0x77; 2048], 0).unwrap();
    let seg = DiscardSegment {
        sector: Le64::from(1),
        num_sectors: Le32::from(2),
        flags: Le32::from(0),
    };
    mem.write_obj(seg, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false), (OK, 1));
    assert_eq!(s.file_bytes(0, 512), vec![0x77; 512]);
    assert_eq!(s.file_bytes(512, 1024), vec![0; 1024]);
    assert_eq!(s.file_bytes(1536, 512), vec![0x77; 512]);
    assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, 16, false), (OK, 1));
    // Reserved flags, too many segments, ranges past the end.
    let bad = DiscardSegment {
        sector: Le64::from(0),
        num_sectors: Le32::from(1),
        flags: Le32::from(2),
    };
    mem.write_obj(bad, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0, UNSUPP);
    assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, 32, false).0, UNSUPP);
    let past = DiscardSegment {
        sector: Le64::from(DISK_SECTORS),
        num_sectors: Le32::from(1),
        flags: Le32::from(0),
    };
    mem.write_obj(past, GuestAddress(DATA)).unwrap();
    assert_eq!(s.request(VIRTIO_BLK_T_DISCARD, 0, 16, false).0, IOERR);
}

#[test]
fn a_write_only_header_gets_ioerr_in_its_last_byte_only() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    mem.write_slice(&[0x11; 16], GuestAddress(HDR)).unwrap();
    let before = s.driver.used_idx();
    s.driver.add(&[Buf(HDR, 16, true)]);
    s.dev.process_queue(0);
    assert_eq!(s.driver.used(before), (0, 1));
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    assert_eq!(
        &hdr[..15],
        &[0x11; 15],
        "nothing but the status byte is written"
    );
    assert_eq!(hdr[15], IOERR);
}

#[test]
fn chains_without_status_or_outside_memory_ask_for_a_reset() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // No writable byte at all.
    let before = s.driver.used_idx();
    s.driver.add(&[Buf(HDR, 16, false)]);
    s.dev.process_queue(0);
    assert_eq!(s.driver.used(before).1, 0);
    assert!(s.intr.needs_reset());
    // A buffer past the end of guest memory: nothing is written anywhere.
    let mut s = setup(&mem, false, false);
    s.driver.add(&[
        Buf(HDR, 16, false),
        Buf(0xfff_f000, 0x2000, true),
        Buf(STATUS, 1, true),
    ]);
    s.dev.process_queue(0);
    assert!(s.intr.needs_reset());
    assert_eq!(s.dev.broken_chains(), 1);
}

#[test]
fn descriptor_loops_and_overflowing_lengths_terminate() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ... : a loop of writable descriptors.
    let w = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, w, 0)),
    ];
    s.driver.add_raw(0, &descs, 0);
    s.dev.process_queue(0);
    assert_eq!(s.driver.used_idx(), 1, "the looping chain is consumed once");
    // Lengths that overflow u32 when summed.
    let mut s = setup(&mem, false, false);
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(DATA, u32::MAX, w, 2)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            u32::MAX,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    s.driver.add_raw(0, &descs, 0);
    s.dev.process_queue(0);
    assert_eq!(s.driver.used_idx(), 1);
    // Zero-length descriptors everywhere.
    let mut s = setup(&mem, false, false);
    assert_eq!(
        s.submit(&[Buf(HDR, 0, false), Buf(DATA, 0, true), Buf(STATUS, 0, true)])
            .1,
        0
    );
    assert!(s.intr.needs_reset());
}

#[test]
fn head_index_out_of_range_and_racing_avail_index_ask_for_a_reset() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    s.driver.push_avail(200);
    s.dev.process_queue(0);
    assert!(s.intr.needs_reset());
    let mut s = setup(&mem, false, false);
    s.driver.set_avail_idx(40); // more than the 16 entries of the ring
    assert!(!s.dev.process_queue(0));
    assert!(s.intr.needs_reset());
    assert_eq!(s.driver.used_idx(), 0);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mem = memory();
    let mut s = setup(&mem, false, true);
    // used_event = 5: the driver wants an interrupt only after entry 5.
    let used_event_at = s.driver.avail_addr() + 4 + 2 * 16;
    mem.write_obj(5u16, GuestAddress(used_event_at)).unwrap();
    s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    assert_eq!(s.intr.used_count(), 0);
    for _ in 0..5 {
        s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    }
    assert_eq!(
        s.intr.used_count(),
        1,
        "exactly when used_idx passes used_event"
    );
    // Without EVENT_IDX every batch is signalled.
    let mut s = setup(&mem, false, false);
    s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    s.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    assert_eq!(s.intr.used_count(), 2);
}

#[test]
fn config_space_advertises_capacity_seg_max_and_block_size() {
    let mem = memory();
    let s = setup(&mem, false, false);
    let dev: &dyn VirtioDevice<GuestMemoryMmap> = &s.dev;
    let mut b8 = [0u8; 8];
    dev.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), DISK_SECTORS);
    let mut b4 = [0u8; 4];
    dev.read_config(12, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), SEG_MAX);
    dev.read_config(20, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512);
    let f = dev.device_features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
}

#[test]
fn a_replaced_image_brings_its_capacity_and_takes_the_next_requests() {
    let mem = memory();
    let mut s = setup(&mem, false, false);
    s.dev.replace_file(image(8 * 512)).unwrap();
    assert_eq!(s.dev.capacity_sectors(), 8);
    let dev: &dyn VirtioDevice<GuestMemoryMmap> = &s.dev;
    let mut b8 = [0u8; 8];
    dev.read_config(0, &mut b8);
    assert_eq!(
        u64::from_le_bytes(b8),
        8,
        "the driver reads the new capacity"
    );
    let (status, _) = s.request(VIRTIO_BLK_T_IN, 8, 512, true);
    assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR, "past the new end");
    let (status, _) = s.request(VIRTIO_BLK_T_IN, 7, 512, true);
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    assert!(matches!(
        Block::<GuestMemoryMmap>::from_file(image(512), false, Some("123456789012345678901")),
        Err(BlockError::SerialTooLong { .. })
    ));
}

#[test]
fn directories_are_not_disks() {
    assert!(matches!(
        Block::<GuestMemoryMmap>::open(&std::env::temp_dir(), false, None, true),
        Err(BlockError::Host(
            crate::host_files::HostFileError::WrongKind { .. }
        ))
    ));
}

#[test]
fn state_restores_onto_the_same_image_and_refuses_a_resized_one() {
    let file = image(DISK_SECTORS * SECTOR_SIZE);
    let dev: Block<GuestMemoryMmap> =
        Block::from_file(file.try_clone().unwrap(), true, Some("disk-7")).unwrap();
    let saved = crate::persist::Persist::save(&dev);
    assert_eq!(saved.serial, "disk-7");
    let json = serde_json::to_string(&saved).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();
    let restored: Block<GuestMemoryMmap> =
        crate::persist::Persist::restore(file.try_clone().unwrap(), &back).unwrap();
    assert_eq!(crate::persist::Persist::save(&restored), saved);
    assert!(restored.is_read_only());

    file.set_len((DISK_SECTORS + 1) * SECTOR_SIZE).unwrap();
    let grown: Result<Block<GuestMemoryMmap>, _> = crate::persist::Persist::restore(file, &back);
    assert!(matches!(
        grown,
        Err(crate::persist::RestoreError::Mismatch { .. })
    ));
}

#[test]
fn a_disk_restores_only_the_state_of_the_same_disk() {
    let small = image(1 << 20);
    let big = image(2 << 20);
    let dev: Block<GuestMemoryMmap> =
        Block::from_file(small.try_clone().unwrap(), false, Some("d")).unwrap();
    let saved = dev.save_device_state();
    let mut same: Block<GuestMemoryMmap> = Block::from_file(small, false, Some("d")).unwrap();
    same.restore_device_state(saved.as_ref()).unwrap();
    let mut other: Block<GuestMemoryMmap> = Block::from_file(big, false, Some("d")).unwrap();
    let err = other.restore_device_state(saved.as_ref()).unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");
    assert!(same.restore_device_state(None).is_err(), "a missing state");
    let garbage = serde_json::json!({"capacity_sectors": "lots"});
    assert!(same.restore_device_state(Some(&garbage)).is_err());
}

#[test]
fn a_rate_limited_disk_puts_requests_back_until_its_timer_fires() {
    let mem = memory();
    let mut s = setup(&mem, false, true);
    s.dev
        .set_rate_limiter(&crate::rate_limiter::RateLimiterConfig {
            bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                size: 8192,
                one_time_burst: None,
                refill_time: 40,
            }),
            ops: None,
        })
        .unwrap();
    // Four 4 KiB reads: two fit in the bucket, the others wait.
    for i in 0..4u64 {
        let hdr = HDR + i * 16;
        let h = RequestHeader {
            request_type: Le32::from(VIRTIO_BLK_T_IN),
            reserved: Le32::from(0),
            sector: Le64::from(i * 8),
        };
        mem.write_obj(h, GuestAddress(hdr)).unwrap();
        s.driver.add(&[
            Buf(hdr, 16, false),
            Buf(DATA + i * 4096, 4096, true),
            Buf(STATUS + i, 1, true),
        ]);
    }
    assert!(!s.dev.process_queue(0));
    assert_eq!(s.driver.used_idx(), 2, "two requests, then the limiter");
    assert_eq!(s.dev.metrics().rate_limiter_throttled_events.get(), 1);
    // A notification while throttled does nothing.
    s.dev.process_queue(0);
    assert_eq!(s.driver.used_idx(), 2);
    let timer = s.dev.event_fds()[0];
    for _ in 0..4 {
        if s.driver.used_idx() == 4 {
            break;
        }
        let mut p = [libc::pollfd {
            fd: timer,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(p.as_mut_ptr(), 1, 2000) }, 1);
        s.dev.process_event(0);
    }
    assert_eq!(s.driver.used_idx(), 4, "the rest once the timer fired");
    for i in 0..4 {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), OK);
    }
}
