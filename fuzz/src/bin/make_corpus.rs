//! Writes the seed corpus of every target, generated from code, into
//! `corpus/<target>/` (the directory given as the first argument, default
//! `corpus`).

use std::fs;
use std::path::Path;

use vmm_kit_fuzz::{Desc, QueueScenario};

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// A buffer inside the buffer area.
fn buf(offset: u32, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        place: 0,
        offset,
        len,
        flags,
        next,
    }
}

/// A queue of size 16 holding one chain made of `descs`, with `payload`.
fn one_chain(descs: Vec<Desc>, payload: Vec<(u16, Vec<u8>)>) -> QueueScenario {
    QueueScenario {
        size_log2: 4,
        descs,
        heads: vec![0],
        avail_extra: 0,
        used_event: 0,
        payload,
    }
}

fn blk_header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&le32(t));
    h.extend_from_slice(&le32(0));
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("corpus dir");
    fs::write(d.join(name), bytes).expect("seed");
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    // Block requests: header at 0, data at 0x100, status at 0x2100.
    let requests: [(&str, u32, u32, bool); 6] = [
        ("in", 0, 512, true),
        ("out", 1, 1024, false),
        ("flush", 4, 0, false),
        ("get-id", 8, 20, true),
        ("discard", 11, 16, false),
        ("write-zeroes", 13, 16, false),
    ];
    for (name, t, len, writable) in requests {
        let mut descs = vec![buf(0, 16, NEXT, 1)];
        if len > 0 {
            descs.push(buf(0x100, len, NEXT | if writable { WRITE } else { 0 }, 2));
        }
        let last = descs.len() as u16;
        descs.push(buf(0x2100, 1, WRITE, last));
        let mut payload = vec![(0u16, blk_header(t, 2))];
        if t == 11 || t == 13 {
            let mut seg = 1u64.to_le_bytes().to_vec();
            seg.extend_from_slice(&le32(2));
            seg.extend_from_slice(&le32(0));
            payload.push((0x100, seg));
        }
        for cfg in [0u8, 1, 2] {
            let mut out = vec![cfg];
            one_chain(descs.clone(), payload.clone()).encode(&mut out);
            write(dir, "virtio_blk", &format!("{name}-{cfg}"), &out);
        }
    }

    // Generic chains for the queue, rng and console targets.
    let chains = [
        (
            "read-write",
            vec![buf(0, 64, NEXT, 1), buf(0x1000, 128, WRITE, 0)],
        ),
        ("writable", vec![buf(0x200, 4096, WRITE, 0)]),
        ("loop", vec![buf(0, 16, NEXT, 1), buf(0x100, 16, NEXT, 0)]),
        (
            "indirect",
            vec![Desc {
                place: 0,
                offset: 0x3000,
                len: 32,
                flags: 4,
                next: 0,
            }],
        ),
        (
            "outside",
            vec![Desc {
                place: 2,
                offset: 0,
                len: 64,
                flags: WRITE,
                next: 0,
            }],
        ),
    ];
    for (name, descs) in chains {
        let s = one_chain(descs, vec![(0x3000, vec![0; 32])]);
        let mut q = vec![0u8];
        s.encode(&mut q);
        write(dir, "virtio_queue", name, &q);
        write(dir, "virtio_rng", name, &q);
        let mut c = vec![5u8];
        c.extend_from_slice(b"input");
        s.encode(&mut c);
        s.encode(&mut c);
        write(dir, "virtio_console", name, &c);
    }

    // virtio-net: receive buffers, a frame to send, frames from the host.
    for (name, cfg, rx_len) in [
        ("mrg", 2u8, 2048u32),
        ("mrg-big", 3, 0x10000),
        ("plain", 0, 1600),
    ] {
        let mut out = vec![cfg];
        let rx = QueueScenario {
            size_log2: 4,
            descs: (0..4)
                .map(|i| buf(0x1000 + i * 0x2000, rx_len.min(0x2000), WRITE, 0))
                .collect(),
            heads: vec![0, 1, 2, 3],
            ..Default::default()
        };
        rx.encode(&mut out);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[0x06, 0, 0, 0, 0, 2, 0x88, 0xb5]);
        frame.resize(12 + 60, 0x5a);
        one_chain(
            vec![buf(0xc000, frame.len() as u32, 0, 0)],
            vec![(0xc000, frame)],
        )
        .encode(&mut out);
        out.push(2);
        for len in [86u16, 2986] {
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&[0x11; 64]);
        }
        out.extend_from_slice(&[0, 1, 2, 3, 0, 4, 2, 0]);
        write(dir, "virtio_net", name, &out);
    }

    // virtio-vsock: a guest connection request, a host CONNECT line.
    let vsock_hdr = |op: u16, len: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(&3u64.to_le_bytes());
        h.extend_from_slice(&2u64.to_le_bytes());
        h.extend_from_slice(&le32(1000));
        h.extend_from_slice(&le32(52));
        h.extend_from_slice(&le32(len));
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&op.to_le_bytes());
        h.extend_from_slice(&le32(0));
        h.extend_from_slice(&le32(65536));
        h.extend_from_slice(&le32(0));
        h
    };
    for (name, op, cfg) in [("request", 1u16, 0u8), ("rw", 5, 1), ("restored", 1, 2)] {
        let mut out = vec![cfg];
        QueueScenario {
            size_log2: 4,
            descs: (0..3)
                .map(|i| buf(0x1000 + i * 0x1100, 44 + 4096, WRITE, 0))
                .collect(),
            heads: vec![0, 1, 2],
            ..Default::default()
        }
        .encode(&mut out);
        let mut pkt = vsock_hdr(op, if op == 5 { 5 } else { 0 });
        pkt.extend_from_slice(b"hello");
        one_chain(
            vec![buf(0x8000, pkt.len() as u32, 0, 0)],
            vec![(0x8000, pkt)],
        )
        .encode(&mut out);
        one_chain(vec![buf(0x9000, 4, WRITE, 0)], Vec::new()).encode(&mut out);
        let hello = b"CONNECT 1234\n";
        out.push(hello.len() as u8);
        out.extend_from_slice(hello);
        out.push(4);
        out.extend_from_slice(b"data");
        out.extend_from_slice(&[1, 0, 2, 1, 0, 3, 2, 0]);
        write(dir, "virtio_vsock", name, &out);
    }

    // A driver bringing the transport up: (op=write to REGS[i], value).
    let mut t = Vec::new();
    QueueScenario {
        size_log2: 4,
        ..Default::default()
    }
    .encode(&mut t);
    let w = |t: &mut Vec<u8>, reg_index: u8, v: u32| {
        t.push(0x20); // write, 4 bytes, register from the table
        t.push(reg_index);
        t.extend_from_slice(&le32(v));
        t.extend_from_slice(&le32(0));
    };
    w(&mut t, 15, 1); // STATUS = ACKNOWLEDGE
    w(&mut t, 15, 3); // DRIVER
    w(&mut t, 7, 1); // DRIVER_FEATURES_SEL = 1
    w(&mut t, 6, 1); // VERSION_1
    w(&mut t, 15, 11); // FEATURES_OK
    w(&mut t, 11, 16); // QUEUE_NUM
    w(&mut t, 18, 0x1000); // QUEUE_DRIVER_LOW
    w(&mut t, 20, 0x2000); // QUEUE_DEVICE_LOW
    w(&mut t, 12, 1); // QUEUE_READY
    w(&mut t, 15, 15); // DRIVER_OK
    t.extend_from_slice(&[0x03, 0]); // process the queue
    write(dir, "mmio_transport", "bring-up", &t);

    // UART: set DLAB, divisor, clear DLAB, send "hi", feed input.
    let mut s = Vec::new();
    for (off, v) in [
        (3u8, 0x80u8),
        (0, 12),
        (1, 0),
        (3, 3),
        (1, 1),
        (0, b'h'),
        (0, b'i'),
    ] {
        s.extend_from_slice(&[0, off, v, 0, 0, 0]);
    }
    s.extend_from_slice(&[2, 0, 3, b'a', b'b', b'c']);
    write(dir, "serial", "session", &s);

    // i8042 reset and a debug exit.
    write(
        dir,
        "i8042",
        "reset-and-exit",
        &[0, 0xfe, 0, 0, 0, 4, 2, 7, 0, 0, 0, 0],
    );

    // Boot images: the test guest, a tiny bzImage header, an empty file.
    let mut b = vec![0u8, 16, 5];
    b.extend_from_slice(b"a=b c");
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&[0x42; 64]);
    let mut with_guest = b.clone();
    with_guest.extend_from_slice(vmm_testguest_image());
    write(dir, "boot_image", "testguest", &with_guest);
    let mut bz = vec![0u8; 0x1000];
    bz[0x1f1] = 4;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x211] = 1;
    bz[0x236] = 1;
    let mut with_bz = b.clone();
    with_bz.extend_from_slice(&bz);
    write(dir, "boot_image", "bzimage", &with_bz);
    write(dir, "boot_image", "empty", &b);

    // API requests: a pipelined boot sequence, a keep-alive pair, one refused.
    let req = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let boot = [
        req("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#),
        req("PUT", "/boot-source", r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#),
        req(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}"#,
        ),
        req("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        req("PATCH", "/vm", r#"{"state": "Paused"}"#),
    ]
    .concat();
    write(dir, "api_request", "boot", boot.as_bytes());
    let pair = [req("GET", "/", ""), req("GET", "/vm/config", "")].concat();
    write(dir, "api_request", "get", pair.as_bytes());
    // Snapshot state files: a small valid one, and its payload alone.
    let payload = br#"{"clock": 12, "devices": [{"type": "rng", "state": {}}], "vcpus": [1, 2]}"#;
    let mut file = b"VMMKSNAP".to_vec();
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(payload);
    write(dir, "snapshot_state", "file", &file);
    write(dir, "snapshot_state", "payload", payload);
    // A whole VM's state, as the first release wrote it.
    let release = include_bytes!("../../../tests/snapshots/v0.1.0/vm.state");
    write(dir, "snapshot_state", "release", release);
    write(dir, "snapshot_state", "release-payload", &release[24..]);
    write(
        dir,
        "api_request",
        "chunked",
        b"PUT /logger HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
}

fn vmm_testguest_image() -> &'static [u8] {
    vmm_testguest::IMAGE
}
