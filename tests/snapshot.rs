//! Snapshots from the outside: the reference VMM pauses a running test
//! guest (its `snapshot` scenario: a memory checksum, counters, two timers,
//! a disk write in flight), saves it over the API, and a new process
//! restores it with `--restore` or `PUT /snapshot/load`; the guest checks
//! that everything carried on and says so when Ctrl-Alt-Del ends it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{call, fault, state, Vmm};
use common::{guest_status, run_minimal, stderr, TempFile};
use serde_json::json;

/// The whole lines of a serial output file (the guest may be in the middle
/// of one).
fn lines(serial: &Path) -> String {
    let mut text = std::fs::read_to_string(serial).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    text
}

/// The last `snapshot round=N` the guest reported in `serial`, if any.
fn last_round(serial: &Path) -> Option<u64> {
    lines(serial)
        .lines()
        .rev()
        .filter_map(|l| l.split("snapshot round=").nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
}

/// Waits until the guest reports a round past `after`; returns it.
fn wait_round_past(vmm: &Vmm, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = last_round(&vmm.serial).filter(|&r| r > after) {
            return r;
        }
        let text = std::fs::read_to_string(&vmm.serial).unwrap_or_default();
        assert!(
            !text.contains("error"),
            "the guest reported an error: {text}"
        );
        assert!(
            Instant::now() < deadline,
            "no round past {after} in the serial output: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits while the VM is still being restored (the API answers first).
fn wait_started(vmm: &Vmm) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = state(&vmm.sock);
        if s != "Not started" {
            return s;
        }
        assert!(Instant::now() < deadline, "the restored VM never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn put(vmm: &Vmm, path: &str, body: serde_json::Value) {
    let (code, answer) = call(&vmm.sock, "PUT", path, Some(body));
    assert_eq!(code, 204, "PUT {path}: {answer}");
}

fn patch_vm(vmm: &Vmm, to: &str) {
    let (code, answer) = call(&vmm.sock, "PATCH", "/vm", Some(json!({ "state": to })));
    assert_eq!(code, 204, "PATCH /vm {to}: {answer}");
}

/// Pauses the VM and snapshots it into `state` and `mem`.
fn snapshot(vmm: &Vmm, state: &Path, mem: &Path, kind: &str) {
    patch_vm(vmm, "Paused");
    put(
        vmm,
        "/snapshot/create",
        json!({
            "snapshot_type": kind,
            "snapshot_path": state,
            "mem_file_path": mem,
        }),
    );
}

/// Ends the guest with Ctrl-Alt-Del and checks its final report.
fn finish(mut vmm: Vmm) -> String {
    let (code, answer) = call(
        &vmm.sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    let serial = std::fs::read_to_string(&vmm.serial).unwrap_or_default();
    assert_eq!(code, 204, "SendCtrlAltDel: {answer}; serial: {serial}");
    let (status, err) = vmm.wait();
    let serial = std::fs::read_to_string(&vmm.serial).unwrap_or_default();
    assert_eq!(
        status.code(),
        guest_status(0),
        "the guest did not pass: {serial}\nstderr: {err}"
    );
    assert!(serial.contains("snapshot ok rounds="), "{serial}");
    serial
}

/// The generation counter and identity the guest reported last.
fn generation(serial: &str) -> (u64, String) {
    let line = serial
        .lines()
        .rev()
        .find(|l| l.contains("generation="))
        .unwrap_or_else(|| panic!("no generation in {serial}"));
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .to_string()
    };
    (
        field("generation=").parse().expect("a number"),
        field("id="),
    )
}

/// A first VM running the `snapshot` scenario with a disk, started over the
/// API.
fn boot(dir: &Path, protocol: &str, vcpus: u8, extra: &[&str]) -> Vmm {
    boot_with_mem(dir, protocol, vcpus, "64", extra)
}

fn boot_with_mem(dir: &Path, protocol: &str, vcpus: u8, mem: &str, extra: &[&str]) -> Vmm {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let run = if vcpus > 1 {
        "testguest.run=smp,snapshot"
    } else {
        "testguest.run=snapshot"
    };
    let kernel = dir.join("guest.elf");
    let disk_arg = format!("{},id=snapdisk", disk.display());
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--boot-protocol",
        protocol,
        "--vcpus",
        &vcpus,
        "--mem",
        mem,
        "--disk",
        &disk_arg,
        "--cmdline",
        run,
    ];
    args.extend_from_slice(extra);
    let vmm = Vmm::start_in(dir, "boot", &args);
    put(&vmm, "/actions", json!({"action_type": "InstanceStart"}));
    vmm
}

fn restore(dir: &Path, name: &str, state: &Path, mems: &[&Path], extra: &[&str]) -> Vmm {
    let mut args: Vec<String> = vec!["--restore".into(), state.display().to_string()];
    for m in mems {
        args.push("--restore-memory".into());
        args.push(m.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vmm::start_in(dir, name, &args)
}

fn chained_cycles(protocol: &str, vcpus: u8) {
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let mut vmm = boot(&dir, protocol, vcpus, &[]);
    let mut round = wait_round_past(&vmm, 0);
    let mut ids = Vec::new();
    for cycle in 1..=3u64 {
        let (state_path, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
        snapshot(&vmm, &state_path, &mem, "Full");
        let at = last_round(&vmm.serial).unwrap_or(0);
        drop(vmm);
        vmm = restore(&dir, &format!("restored{cycle}"), &state_path, &[&mem], &[]);
        assert_eq!(wait_started(&vmm), "Running");
        round = wait_round_past(&vmm, round.max(at));
        let serial = lines(&vmm.serial);
        let (generation, id) = generation(&serial);
        assert_eq!(generation, cycle, "one more per restore: {serial}");
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "each restore gets a new identity: {ids:?}");
    let serial = finish(vmm);
    assert!(!serial.contains("error"), "{serial}");
}

#[test]
fn three_chained_cycles_pvh_one_vcpu() {
    chained_cycles("pvh", 1);
}

#[test]
fn three_chained_cycles_linux64_one_vcpu() {
    chained_cycles("linux64", 1);
}

#[test]
fn three_chained_cycles_pvh_four_vcpus() {
    chained_cycles("pvh", 4);
}

#[test]
fn three_chained_cycles_linux64_four_vcpus() {
    chained_cycles("linux64", 4);
}

/// Allocated bytes of a file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).expect("metadata").blocks() * 512
}

#[test]
fn diff_snapshots_layer_over_a_full_one_and_merge_into_it() {
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let vmm = boot(&dir, "pvh", 1, &["--track-dirty-pages"]);
    let round = wait_round_past(&vmm, 0);
    let (full_state, full_mem) = (dir.join("full.state"), dir.join("full.mem"));
    snapshot(&vmm, &full_state, &full_mem, "Full");
    patch_vm(&vmm, "Resumed");
    let round = wait_round_past(&vmm, round);
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    snapshot(&vmm, &diff_state, &diff_mem, "Diff");
    // A second diff layers over the first.
    patch_vm(&vmm, "Resumed");
    let round = wait_round_past(&vmm, round);
    let (diff2_state, diff2_mem) = (dir.join("diff2.state"), dir.join("diff2.mem"));
    snapshot(&vmm, &diff2_state, &diff2_mem, "Diff");
    drop(vmm);
    assert_eq!(
        std::fs::metadata(&diff_mem).expect("diff").len(),
        64 << 20,
        "a layer has the RAM's size"
    );
    assert!(
        allocated(&diff_mem) < allocated(&full_mem),
        "a diff holds fewer pages: {} vs {}",
        allocated(&diff_mem),
        allocated(&full_mem)
    );

    // Missing a layer: refused before anything runs.
    let out = run_minimal(&[
        "--restore",
        diff2_state.to_str().expect("utf-8"),
        "--restore-memory",
        full_mem.to_str().expect("utf-8"),
        "--restore-memory",
        diff_mem.to_str().expect("utf-8"),
        "--serial",
        "none",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("3 memory file"), "{}", stderr(&out));

    // Each restore gets the disk as it was at the snapshot (the disk is
    // not part of a snapshot: a restore that ran on would change it).
    let disk_at = |name: &str| {
        let copy = dir.join(format!("{name}.img"));
        std::fs::copy(dir.join("disk.img"), &copy).expect("disk copy");
        format!("snapdisk={}", copy.display())
    };
    // The layers in order.
    let d = disk_at("layered");
    let vmm = restore(
        &dir,
        "layered",
        &diff2_state,
        &[&full_mem, &diff_mem, &diff2_mem],
        &["--restore-disk", &d],
    );
    wait_round_past(&vmm, round);
    finish(vmm);

    // Merged into one file with the merge tool.
    let merged = dir.join("merged.mem");
    std::fs::copy(&full_mem, &merged).expect("copy");
    let out = run_minimal(&[
        "--merge-memory",
        merged.to_str().expect("utf-8"),
        diff_mem.to_str().expect("utf-8"),
        diff2_mem.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = disk_at("merged");
    let vmm = restore(
        &dir,
        "merged",
        &diff2_state,
        &[&merged],
        &["--restore-disk", &d],
    );
    wait_round_past(&vmm, round);
    finish(vmm);
}

fn sha(p: &Path) -> Vec<u8> {
    let bytes = std::fs::read(p).expect("read");
    // A cheap digest is enough to see a change.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h.to_le_bytes().to_vec()
}

#[test]
fn clones_run_side_by_side_each_with_its_own_identity_and_disk() {
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let vmm = boot(&dir, "pvh", 1, &[]);
    let round = wait_round_past(&vmm, 0);
    let (state_path, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    snapshot(&vmm, &state_path, &mem, "Full");
    drop(vmm);
    let mem_digest = sha(&mem);
    let disk = dir.join("disk.img");
    let disk_digest = sha(&disk);
    let overlays: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.join(format!("clone{i}.img"));
            std::fs::copy(&disk, &p).expect("overlay");
            p
        })
        .collect();
    let clones: Vec<Vmm> = overlays
        .iter()
        .enumerate()
        .map(|(i, overlay)| {
            let d = format!("snapdisk={}", overlay.display());
            restore(
                &dir,
                &format!("clone{i}"),
                &state_path,
                &[&mem],
                &["--restore-disk", &d],
            )
        })
        .collect();
    for c in &clones {
        wait_round_past(c, round + 250);
    }
    let ids: Vec<(u64, String)> = clones
        .iter()
        .map(|c| generation(&lines(&c.serial)))
        .collect();
    assert_eq!(ids[0].0, 1);
    assert_eq!(ids[1].0, 1);
    assert_ne!(ids[0].1, ids[1].1, "clones have their own identity");
    for c in clones {
        finish(c);
    }
    assert_eq!(sha(&mem), mem_digest, "the memory file never changes");
    // Both wrote their own overlays; the snapshot's image is untouched.
    assert_eq!(
        sha(&disk),
        disk_digest,
        "the snapshot's own disk stays as it was"
    );
    for o in &overlays {
        assert_ne!(sha(o), disk_digest, "{} was written", o.display());
    }
}

#[test]
fn the_api_loads_snapshots_with_firecrackers_rules() {
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let vmm = boot(&dir, "linux64", 1, &[]);
    let (state_path, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let body = json!({"snapshot_path": state_path, "mem_file_path": mem});
    // Only a paused VM is saved.
    let round = wait_round_past(&vmm, 0);
    let (code, answer) = call(&vmm.sock, "PUT", "/snapshot/create", Some(body.clone()));
    assert_eq!(code, 400);
    assert!(fault(&answer).contains("pause"), "{answer}");
    patch_vm(&vmm, "Paused");
    let diff = json!({"snapshot_path": state_path, "mem_file_path": mem, "snapshot_type": "Diff"});
    let (code, answer) = call(&vmm.sock, "PUT", "/snapshot/create", Some(diff));
    assert_eq!(code, 400);
    assert!(fault(&answer).contains("dirty page tracking"), "{answer}");
    put(&vmm, "/snapshot/create", body);
    // A load in a running VMM is refused.
    let load = json!({
        "snapshot_path": state_path,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": false,
    });
    let (code, answer) = call(&vmm.sock, "PUT", "/snapshot/load", Some(load.clone()));
    assert_eq!(code, 400);
    assert!(fault(&answer).contains("after starting"), "{answer}");
    drop(vmm);

    // Not after a boot resource was configured.
    let fresh = Vmm::start_in(&dir, "fresh", &[]);
    put(
        &fresh,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    let (code, answer) = call(&fresh.sock, "PUT", "/snapshot/load", Some(load.clone()));
    assert_eq!(code, 400);
    assert_eq!(
        fault(&answer),
        "Loading a microVM snapshot not allowed after configuring boot-specific resources."
    );
    drop(fresh);

    // Bad files: clear errors, and the VMM waits for a better request.
    let loader = Vmm::start_in(&dir, "loader", &[]);
    let garbage = dir.join("garbage.state");
    std::fs::write(&garbage, b"this is not a snapshot").expect("write");
    let short_mem = dir.join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 4096]).expect("write");
    for (state_file, mem_file, needle) in [
        (
            garbage.as_path(),
            mem.as_path(),
            "not a snapshot state file",
        ),
        (
            dir.join("missing.state").as_path(),
            mem.as_path(),
            "missing.state",
        ),
        (state_path.as_path(), short_mem.as_path(), "4096 bytes"),
    ] {
        let bad = json!({"snapshot_path": state_file, "mem_file_path": mem_file});
        let (code, answer) = call(&loader.sock, "PUT", "/snapshot/load", Some(bad));
        assert_eq!(code, 400, "{answer}");
        assert!(fault(&answer).contains(needle), "{needle}: {answer}");
        assert_eq!(state(&loader.sock), "Not started");
    }
    let uffd = json!({
        "snapshot_path": state_path,
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/nowhere.sock"},
    });
    let (code, answer) = call(&loader.sock, "PUT", "/snapshot/load", Some(uffd));
    assert_eq!(code, 400);
    assert!(fault(&answer).contains("Uffd"), "{answer}");
    // Loaded paused, as asked; resumed by PATCH /vm.
    put(&loader, "/snapshot/load", load);
    assert_eq!(state(&loader.sock), "Paused");
    let (code, cfg) = call(&loader.sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    assert!(cfg.contains("\"mem_size_mib\":64"), "{cfg}");
    patch_vm(&loader, "Resumed");
    wait_round_past(&loader, round);
    finish(loader);
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_before_anything_runs() {
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let vmm = boot(&dir, "pvh", 1, &[]);
    wait_round_past(&vmm, 0);
    let (state_path, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    snapshot(&vmm, &state_path, &mem, "Full");
    drop(vmm);
    let good = std::fs::read(&state_path).expect("state");
    let try_restore = |state_bytes: &[u8], mem: &Path| {
        let p = dir.join("try.state");
        std::fs::write(&p, state_bytes).expect("write");
        run_minimal(&[
            "--restore",
            p.to_str().expect("utf-8"),
            "--restore-memory",
            mem.to_str().expect("utf-8"),
            "--serial",
            "none",
        ])
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x20;
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let mut long = good.clone();
    long.extend_from_slice(b"junk");
    let short_mem = dir.join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 1 << 20]).expect("write");
    for (bytes, memory, needle) in [
        (&good[..good.len() / 2], mem.as_path(), "truncated"),
        (&long[..], mem.as_path(), "padded"),
        (&flipped[..], mem.as_path(), "corrupt"),
        (&newer[..], mem.as_path(), "newer"),
        (
            &b"\x7fELF\x02\x01\x01\0 not a snapshot at all, but long enough"[..],
            mem.as_path(),
            "not a snapshot state file",
        ),
        (&good[..], short_mem.as_path(), "1048576 bytes"),
        (
            &good[..],
            Path::new("/nonexistent/vm.mem"),
            "/nonexistent/vm.mem",
        ),
        (&good[..], dir.as_path(), "memory file"),
    ] {
        let out = try_restore(bytes, memory);
        assert_eq!(out.status.code(), Some(1), "{needle}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{needle}: {}", stderr(&out));
    }
    // A disk override naming no disk, or an image of another size.
    let other = dir.join("other.img");
    std::fs::write(&other, vec![0u8; 2 << 20]).expect("write");
    for (arg, needle) in [
        ("nosuchdisk=/tmp/x".to_string(), "no disk with the id"),
        (format!("snapdisk={}", other.display()), "capacity"),
    ] {
        let out = run_minimal(&[
            "--restore",
            state_path.to_str().expect("utf-8"),
            "--restore-memory",
            mem.to_str().expect("utf-8"),
            "--restore-disk",
            &arg,
            "--serial",
            "none",
        ]);
        assert_eq!(out.status.code(), Some(1), "{needle}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{needle}: {}", stderr(&out));
    }
}

/// Where the snapshots each release wrote are kept.
fn release_snapshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

/// Writes this release's snapshot into `tests/snapshots/v<version>/` (run by
/// hand at each release: `cargo test --test snapshot -- --ignored
/// write_this_releases_snapshot`); CI restores every one of them.
#[test]
#[ignore]
fn write_this_releases_snapshot() {
    let out = release_snapshots().join(format!("v{}", env!("CARGO_PKG_VERSION")));
    assert!(
        !out.exists(),
        "{} exists: a release's snapshot is never rewritten",
        out.display()
    );
    let tmp = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let vmm = boot_with_mem(&dir, "pvh", 2, "8", &[]);
    wait_round_past(&vmm, 250);
    std::fs::create_dir_all(&out).expect("snapshot directory");
    snapshot(&vmm, &out.join("vm.state"), &out.join("vm.mem"), "Full");
    drop(vmm);
    std::fs::copy(dir.join("disk.img"), out.join("disk.img")).expect("disk");
}

#[test]
fn snapshots_written_by_every_release_restore() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(release_snapshots())
        .expect("tests/snapshots")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no release snapshots under tests/snapshots"
    );
    for release in dirs {
        let tmp = TempFile::new(
            "disk.img",
            &std::fs::read(release.join("disk.img")).expect("disk"),
        );
        let dir = tmp.path.parent().expect("dir").to_path_buf();
        let disk = format!("snapdisk={}", tmp.arg());
        let mut vmm = restore(
            &dir,
            "release",
            &release.join("vm.state"),
            &[&release.join("vm.mem")],
            &["--restore-disk", &disk],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let restored = loop {
            if let Some(status) = vmm.child.try_wait().expect("wait") {
                break Err(status);
            }
            if state(&vmm.sock) != "Not started" {
                break Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{}: never started",
                release.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        match restored {
            Ok(()) => {
                wait_round_past(&vmm, 0);
                let serial = finish(vmm);
                let (generation, _) = generation(&serial);
                assert_eq!(generation, 1, "{}: {serial}", release.display());
            }
            Err(status) => {
                // The one refusal allowed: a host whose CPU lacks what the
                // snapshot's host had. It must say so.
                let (_, err) = vmm.wait();
                assert!(
                    err.contains("lacks CPU features"),
                    "{} did not restore ({status}): {err}",
                    release.display()
                );
                eprintln!("{}: refused on this host: {err}", release.display());
            }
        }
    }
}

/// The library API alone, in one process: a VM saved through its handle
/// and restored through `VmConfig::restore`, paused, then resumed.
#[test]
fn the_library_saves_and_restores_in_process() {
    use vmm_kit::core::snapshot::{RestoreConfig, SnapshotKind, SnapshotRequest};
    use vmm_kit::core::{HostIo, KernelSource, VmConfig, VmExit, Vmm};
    common::require_kvm();
    let tmp = TempFile::new("disk.img", &vec![0u8; 1 << 20]);
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let out = common::SharedBuf::default();
    let mut disk = vmm_kit::core::DiskConfig::new(&tmp.path);
    disk.serial = Some("snapdisk".into());
    let config = VmConfig {
        kernel: KernelSource::Bytes(vmm_kit::testguest::IMAGE),
        cmdline: "testguest.run=snapshot".into(),
        mem_mib: 32,
        disks: vec![disk],
        ..VmConfig::default()
    };
    let vmm = Vmm::new(&config, HostIo::serial(Box::new(out.clone()))).expect("build");
    let handle = vmm.handle();
    let running = vmm.start().expect("start");
    out.wait_for("snapshot round=250", Duration::from_secs(30));
    handle.pause().expect("pause");
    let req = SnapshotRequest {
        state_path: dir.join("vm.state"),
        memory_path: dir.join("vm.mem"),
        kind: SnapshotKind::Full,
    };
    let info = handle.snapshot(&req).expect("snapshot");
    assert_eq!(info.layers, 1);
    assert!(
        info.memory_bytes > 0 && info.memory_bytes < 32 << 20,
        "{info:?}"
    );
    // Diffs need dirty page tracking, which this VM does not have.
    let diff = SnapshotRequest {
        kind: SnapshotKind::Diff,
        ..req.clone()
    };
    assert!(handle.snapshot(&diff).is_err());
    handle.stop();
    running.wait().expect("the first VM ends");

    let again = common::SharedBuf::default();
    let restored = VmConfig {
        restore: Some(RestoreConfig {
            state_path: req.state_path.clone(),
            memory: vec![req.memory_path.clone()],
            resume: false,
            ..RestoreConfig::default()
        }),
        ..VmConfig::default()
    };
    let vmm = Vmm::new(&restored, HostIo::serial(Box::new(again.clone()))).expect("restore");
    assert!(
        vmm.boot_setup().is_none(),
        "a restored VM did not boot here"
    );
    let handle = vmm.handle();
    let running = vmm.start().expect("start the restored VM");
    assert!(handle.is_paused(), "restored paused, as asked");
    assert_eq!(handle.generation().0, 1);
    handle.resume().expect("resume");
    again.wait_for("snapshot round=", Duration::from_secs(30));
    handle.send_ctrl_alt_del().expect("keys");
    assert_eq!(running.wait().expect("run"), VmExit::GuestStatus(0));
    assert!(again.text().contains("snapshot ok"), "{}", again.text());
}

/// The snapshot flags with nonsense: a usage error or a clear refusal,
/// never a panic, and the files named are left as they were.
#[test]
fn snapshot_flags_with_nonsense_are_refused_clearly() {
    let tmp = TempFile::new("base.mem", &vec![7u8; 1 << 20]);
    let base = tmp.arg().to_string();
    let dir = tmp.path.parent().expect("dir").to_path_buf();
    let short = dir.join("short.mem");
    std::fs::write(&short, vec![1u8; 4096]).expect("write");
    let short = short.to_str().expect("utf-8").to_string();
    for (args, code, needle) in [
        (vec!["--restore", "/x.state"], 3, "--restore-memory"),
        (vec!["--restore-memory", "/x.mem"], 3, "--restore"),
        (
            vec![
                "--restore",
                "/x.state",
                "--restore-memory",
                "/x.mem",
                "--kernel",
                "/k",
            ],
            3,
            "cannot be used with",
        ),
        (
            vec![
                "--restore",
                "/x.state",
                "--restore-memory",
                "/x.mem",
                "--restore-disk",
                "nonsense",
            ],
            3,
            "expected ID=PATH",
        ),
        (vec!["--merge-memory", &base], 3, "2 values"),
        (
            vec!["--merge-memory", &base, "/nonexistent.mem"],
            1,
            "/nonexistent.mem",
        ),
        (vec!["--merge-memory", &base, &short], 1, "4096 bytes"),
        (vec!["--merge-memory", &short, &base], 1, "bytes"),
    ] {
        let out = run_minimal(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read(&tmp.path).expect("base"),
        vec![7u8; 1 << 20],
        "a refused merge leaves the base as it was"
    );
}
