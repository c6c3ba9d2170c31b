//! End-to-end: the test guest as a harness for device authors (`probe`,
//! `pio`, `mmio`, `virtio` scenarios), and the example VMM with devices of
//! its own.

mod common;

use std::process::Command;

use common::{example_bin, require_kvm, SharedBuf, TempFile};
use vmm_kit::core::{HostIo, KernelSource, VmBuilder, VmExit};
use vmm_kit::devices::virtio::block::Block;
use vmm_kit::devices::virtio::rng::Rng;
use vmm_kit::devices::virtio::{VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_kit::memory::{GuestRam, RamBacking};
use vmm_kit::testguest::{parse_output, Report};

/// Boots the test guest with `cmdline` and the devices `add` puts in;
/// returns the exit and the guest's reports.
fn boot(cmdline: &str, add: impl FnOnce(&mut VmBuilder)) -> (VmExit, Vec<Report>, String) {
    require_kvm();
    let out = SharedBuf::default();
    let mut b = VmBuilder::new(64, RamBacking::Anonymous).expect("memory");
    b.kernel(KernelSource::Bytes(vmm_kit::testguest::IMAGE))
        .cmdline(cmdline)
        .host_io(HostIo::serial(Box::new(out.clone())));
    add(&mut b);
    let exit = b.build().expect("build").run().expect("run");
    let text = out.text();
    (exit, parse_output(&text), text)
}

fn find<'a>(reports: &'a [Report], event: &str, key: &str, value: &str) -> &'a Report {
    reports
        .iter()
        .find(|r| r.event == event && r.get(key) == Some(value))
        .unwrap_or_else(|| panic!("no {event} report with {key}={value}: {reports:?}"))
}

#[test]
fn probe_reports_each_device_type_features_queues_and_config() {
    let disk = TempFile::new("disk.img", &[0u8; 8 * 512]);
    let (exit, reports, text) = boot("testguest.run=probe,exit testguest.exit=0", |b| {
        let block = Block::open(&disk.path, true, None, true).expect("disk");
        b.add_virtio(block).expect("blk");
        b.add_virtio(Rng::new()).expect("rng");
    });
    assert_eq!(exit, VmExit::GuestStatus(0), "{text}");
    let blk = find(&reports, "probe", "type", "2");
    let features = u64::from_str_radix(
        blk.get("features")
            .expect("features")
            .trim_start_matches("0x"),
        16,
    )
    .expect("hex features");
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(
        features & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO on a read-only disk"
    );
    assert_eq!(blk.get("queues"), Some("256"));
    let config = blk.get("config").expect("config");
    assert!(
        config.starts_with("0800000000000000"),
        "capacity 8 sectors first: {config}"
    );
    let rng = find(&reports, "probe", "type", "4");
    assert_eq!(rng.get("queues"), Some("256"));
    assert_eq!(rng.get("config"), Some("00000000000000000000000000000000"));
    assert_eq!(find(&reports, "probe", "devices", "2").event, "probe");
}

#[test]
fn mmio_reads_a_transport_register_and_pio_reads_and_writes_ports() {
    let mut window = 0;
    let (exit, reports, text) = boot("", |b| {
        let rng = b.add_virtio(Rng::new()).expect("rng");
        window = rng.window().start();
        // The scratch register of COM1 (offset 7) keeps what is written.
        b.cmdline(&format!(
            "testguest.run=mmio,pio,exit testguest.exit=0 testguest.mmio=r4@{window:#x},r4@{:#x} \
             testguest.pio=w1@0x3ff=0x5a,r1@0x3ff",
            window + 8
        ));
    });
    assert_eq!(exit, VmExit::GuestStatus(0), "{text}");
    let magic = find(&reports, "mmio", "addr", &format!("{window:#x}"));
    assert_eq!(magic.get("value"), Some("0x74726976"), "\"virt\"");
    let id = find(&reports, "mmio", "addr", &format!("{:#x}", window + 8));
    assert_eq!(id.get("value"), Some("0x4"), "device id of virtio-rng");
    let reads: Vec<_> = reports
        .iter()
        .filter(|r| r.event == "pio" && r.get("addr") == Some("0x3ff"))
        .map(|r| r.get("value"))
        .collect();
    assert_eq!(
        reads,
        [Some("0x5a"), Some("0x5a")],
        "written, then read back"
    );
}

#[test]
fn malformed_accesses_are_refused_by_the_guest_not_performed() {
    let (exit, reports, text) = boot("testguest.run=pio testguest.pio=w3@0x80=1", |_| {});
    assert_ne!(exit, VmExit::GuestStatus(0), "{text}");
    assert!(reports.iter().any(|r| r.event == "error"), "{text}");
}

/// A device with one small queue that completes chains without writing.
struct Tiny {
    common: VirtioCommon<GuestRam>,
    chains: u64,
}

impl VirtioDevice<GuestRam> for Tiny {
    fn common(&self) -> &VirtioCommon<GuestRam> {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon<GuestRam> {
        &mut self.common
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_queue(&mut self, index: usize) -> bool {
        let chains = &mut self.chains;
        self.common
            .drain(index, "tiny", |_, _| {
                *chains += 1;
                Some(0)
            })
            .more
    }
}

#[test]
fn the_guest_driver_takes_any_queue_maximum_and_any_device_type() {
    let mut handles = None;
    let (exit, reports, text) = boot(
        "testguest.run=virtio,exit testguest.exit=0 testguest.virtio=0x77:1:0102:0",
        |b| {
            let tiny = Tiny {
                common: VirtioCommon::new(0x77, VIRTIO_F_VERSION_1, &[2, 4]),
                chains: 0,
            };
            handles = Some(b.add_virtio(tiny).expect("tiny"));
        },
    );
    assert_eq!(exit, VmExit::GuestStatus(0), "{text}");
    let r = find(&reports, "virtio", "type", "119");
    assert_eq!(r.get("used_len"), Some("0"));
    assert_eq!(
        r.get("size"),
        Some("4"),
        "the device's maximum, below the guest's"
    );
    let tiny = handles.expect("handle");
    assert_eq!(tiny.with(|t| t.chains), Some(1), "one chain on queue 1");
}

#[test]
fn the_custom_device_example_boots_and_sees_both_devices_used() {
    require_kvm();
    let out = Command::new(example_bin("custom_device"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports = parse_output(&stdout);
    let answer = find(&reports, "virtio", "type", "16962");
    assert_eq!(answer.get("data"), Some("48454c4c4f"), "\"HELLO\"");
    assert!(
        stdout.contains("virtio requests: 1; port writes: 1"),
        "{stdout}"
    );
}
