//! The reference VMM never loses data and never hangs: FIFOs and other
//! blocking paths, outputs that are inputs, two VMMs on one image, one
//! image twice, stalled host output, signals, the console's escape key,
//! and what a hurried operator types.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_clean_failure, guest_status, minimal_bin, require_kvm, run_minimal, stderr, stdout,
    TempFile,
};
use vmm_kit::testguest::parse_output;

/// Waits for `child`, failing (and killing it) after `limit`.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what}: the VMM did not end within {limit:?}; stderr: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(minimal_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference VMM")
}

/// Reads `child`'s stdout until `needle` appears.
fn read_until(child: &mut Child, needle: &str) {
    let out = child.stdout.as_mut().expect("stdout");
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(30), "no {needle:?}");
        let n = out.read(&mut buf).expect("read");
        assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

fn mkfifo(dir: &TempFile, name: &str) -> String {
    let path = dir.path.parent().expect("dir").join(name);
    let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn fifos_anywhere_a_file_is_expected_are_refused_without_hanging() {
    let anchor = TempFile::new("anchor", b"");
    let fifo = mkfifo(&anchor, "fifo");
    let cases: Vec<Vec<String>> = vec![
        vec!["--kernel".into(), fifo.clone()],
        vec!["--initrd".into(), fifo.clone()],
        vec!["--inspect-kernel".into(), fifo.clone()],
        vec!["--disk".into(), format!("{fifo},ro")],
        vec!["--disk".into(), fifo.clone()],
        vec!["--console".into(), format!("file={fifo}")],
        vec!["--serial".into(), format!("file={fifo}")],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = wait_bounded(spawn(&args), Duration::from_secs(20), &args.join(" "));
        assert_clean_failure(&out, "FIFO");
    }
}

#[test]
fn an_output_that_is_one_of_the_inputs_is_refused_and_left_intact() {
    let disk = TempFile::new("disk.img", &[0x5a; 4096]);
    let link = disk.path.parent().expect("dir").join("link.img");
    std::os::unix::fs::symlink(&disk.path, &link).expect("symlink");
    let kernel = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let initrd = TempFile::new("initrd", b"initrd bytes");
    let link = link.to_str().expect("utf-8");
    let refused = [
        vec![
            "--disk",
            disk.arg(),
            "--console",
            &format!("file={}", disk.arg()),
        ],
        vec!["--disk", disk.arg(), "--serial", &format!("file={link}")],
        vec![
            "--kernel",
            kernel.arg(),
            "--serial",
            &format!("file={}", kernel.arg()),
        ],
        vec![
            "--initrd",
            initrd.arg(),
            "--console",
            &format!("file={}", initrd.arg()),
        ],
    ]
    .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
    for args in &refused {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&run_minimal(&args), "refusing to overwrite it");
    }
    assert_eq!(std::fs::read(&disk.path).expect("disk"), vec![0x5a; 4096]);
    assert_eq!(
        std::fs::read(&kernel.path).expect("kernel"),
        vmm_kit::testguest::IMAGE
    );
    assert_eq!(
        std::fs::read(&initrd.path).expect("initrd"),
        b"initrd bytes"
    );
}

#[test]
fn a_second_vmm_cannot_take_an_image_the_first_writes() {
    require_kvm();
    let disk = TempFile::new("shared.img", &[0u8; 1 << 20]);
    let mut first = spawn(&["--disk", disk.arg(), "--cmdline", "testguest.run=spin"]);
    read_until(&mut first, "testguest: spin");
    for spec in [disk.arg().to_string(), format!("{},ro", disk.arg())] {
        let out = run_minimal(&["--disk", &spec]);
        assert_clean_failure(&out, "is in use read-write by process");
        assert!(
            stderr(&out).contains(&first.id().to_string()),
            "names the holder: {}",
            stderr(&out)
        );
    }
    let out = run_minimal(&[
        "--disk",
        &format!("{},nolock", disk.arg()),
        "--cmdline",
        "testguest.run=exit testguest.exit=0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nolock opts out: {}",
        stderr(&out)
    );
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn read_only_users_share_an_image() {
    require_kvm();
    let disk = TempFile::new("ro.img", &[0u8; 1 << 20]);
    let ro = format!("{},ro", disk.arg());
    let mut first = spawn(&["--disk", &ro, "--cmdline", "testguest.run=spin"]);
    read_until(&mut first, "testguest: spin");
    let out = run_minimal(&[
        "--disk",
        &ro,
        "--cmdline",
        "testguest.run=exit testguest.exit=0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run_minimal(&["--disk", disk.arg()]);
    assert_clean_failure(&out, "is in use read-only");
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn one_image_twice_in_one_vm_is_refused_unless_both_are_read_only() {
    require_kvm();
    let disk = TempFile::new("twice.img", &[0u8; 1 << 20]);
    let link = disk.path.parent().expect("dir").join("again.img");
    std::os::unix::fs::symlink(&disk.path, &link).expect("symlink");
    let link = link.to_str().expect("utf-8");
    let out = run_minimal(&["--disk", disk.arg(), "--disk", &format!("{link},ro")]);
    assert_clean_failure(&out, "is given twice");
    let out = run_minimal(&[
        "--disk",
        &format!("{},ro", disk.arg()),
        "--disk",
        &format!("{link},ro"),
        "--cmdline",
        "testguest.run=hello,exit testguest.exit=0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn memory_sizes_take_units_and_bad_ones_say_why() {
    require_kvm();
    for (arg, mib) in [("64M", 64), ("96MiB", 96), ("1G", 1024), ("80", 80)] {
        let out = run_minimal(&[
            "--mem",
            arg,
            "--cmdline",
            "testguest.run=hello,exit testguest.exit=0",
        ]);
        assert_eq!(out.status.code(), Some(0), "{arg}: {}", stderr(&out));
        let hello = parse_output(&stdout(&out))
            .into_iter()
            .find(|r| r.event == "hello")
            .expect("hello");
        assert_eq!(hello.get_u64("mem_mib"), Some(mib), "{arg}");
    }
    for (arg, needle) in [
        ("1500K", "whole MiB"),
        ("0", "needs some RAM"),
        ("12X", "unknown unit"),
        ("lots", "not a size"),
    ] {
        let out = run_minimal(&["--mem", arg]);
        assert_eq!(out.status.code(), Some(3), "{arg}");
        assert!(stderr(&out).contains(needle), "{arg}: {}", stderr(&out));
    }
}

#[test]
fn the_serial_console_goes_to_a_file_truncated_or_appended_as_asked() {
    require_kvm();
    let file = TempFile::new("serial.log", b"old line\n");
    let run = |spec: &str| {
        run_minimal(&[
            "--serial",
            spec,
            "--cmdline",
            "testguest.run=hello,exit testguest.exit=0",
        ])
    };
    let out = run(&format!("file={},append", file.arg()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stdout(&out).contains("testguest:"), "not on stdout");
    let text = std::fs::read_to_string(&file.path).expect("log");
    assert!(
        text.starts_with("old line\n") && text.contains("testguest: hello"),
        "{text}"
    );
    let out = run(&format!("file={}", file.arg()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file.path).expect("log");
    assert!(
        !text.contains("old line") && text.contains("testguest: hello"),
        "{text}"
    );
}

#[test]
fn the_serial_console_can_be_a_pty() {
    require_kvm();
    let mut child = Command::new(minimal_bin())
        .args(["--serial", "pty", "--cmdline", "testguest.run=spin"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let path = loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut err, &mut line).expect("stderr line");
        assert!(n > 0, "no pty path on stderr");
        if let Some(p) = line.trim().strip_prefix("vmm: serial console on ") {
            break p.to_string();
        }
    };
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the pty");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("testguest: spin") {
        let n = pty.read(&mut buf).expect("read the pty");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGTERM));
}

#[test]
fn a_stalled_console_never_keeps_a_signal_from_stopping_the_vmm() {
    require_kvm();
    // The guest prints without end; nobody reads its output, and the pipe
    // holds one page.
    let mut child = spawn(&["--cmdline", "testguest.run=flood"]);
    let fd = child.stdout.as_ref().expect("stdout").as_raw_fd();
    // SAFETY: F_SETPIPE_SZ on a pipe we own.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 4096) };
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let _keep_the_pipe_unread = child.stdout.take();
    let out = wait_bounded(child, Duration::from_secs(10), "stalled console");
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bytes of guest output were lost"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_guest_status_is_never_mistaken_for_the_vmms_own() {
    require_kvm();
    for n in [1u8, 2, 65, 79] {
        let out = run_minimal(&[
            "--cmdline",
            &format!("testguest.run=exit testguest.exit={n}"),
        ]);
        assert_eq!(out.status.code(), guest_status(n), "guest status {n}");
        assert_eq!(out.status.code().map(|c| c % 2), Some(0), "even");
    }
    let out = run_minimal(&["--cmdline", "testguest.run=exit testguest.exit=200"]);
    assert_eq!(out.status.code(), Some(254));
}

/// A pseudo-terminal pair for a child's stdin: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two descriptors; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are new and ours.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

fn lflags(f: &std::fs::File) -> libc::tcflag_t {
    vmm_kit::core::host_io::get_termios(f.as_raw_fd())
        .expect("termios")
        .c_lflag
}

#[test]
fn on_a_terminal_ctrl_a_x_quits_and_the_terminal_is_restored() {
    require_kvm();
    let (mut master, slave) = openpty();
    let before = lflags(&slave);
    assert_ne!(before & libc::ICANON, 0, "a cooked terminal to start with");
    let mut child = Command::new(minimal_bin())
        .args(["--cmdline", "testguest.run=spin"])
        .stdin(slave.try_clone().expect("slave"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    read_until(&mut child, "testguest: spin");
    assert_eq!(lflags(&slave) & libc::ICANON, 0, "raw while the VM runs");
    master.write_all(b"\x01x").expect("type the escape");
    let out = wait_bounded(child, Duration::from_secs(10), "escape");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(lflags(&slave), before, "the terminal is as it was");
}

#[test]
fn truncated_bzimages_and_entry_points_outside_the_image_are_refused() {
    let mut bz = vmm_kit::boot::test_utils::tiny_bzimage(0x020f, 1, &[0x90; 4096]);
    bz.truncate(bz.len() - 100);
    let f = TempFile::new("bzImage", &bz);
    assert_clean_failure(
        &run_minimal(&["--inspect-kernel", f.arg()]),
        "truncated bzImage",
    );
    assert_clean_failure(&run_minimal(&["--kernel", f.arg()]), "truncated bzImage");
    let mut elf = vmm_kit::boot::test_utils::tiny_elf(0x20_0000, &[0xf4; 16], 16, None);
    elf[24..32].copy_from_slice(&0x90_0000u64.to_le_bytes());
    let f = TempFile::new("vmlinux", &elf);
    assert_clean_failure(
        &run_minimal(&["--inspect-kernel", f.arg()]),
        "entry point is outside every loaded segment",
    );
    assert_clean_failure(
        &run_minimal(&["--kernel", f.arg()]),
        "entry point is outside every loaded segment",
    );
}

#[test]
fn an_empty_initrd_and_odd_command_line_characters_are_named() {
    let empty = TempFile::new("initrd", b"");
    assert_clean_failure(
        &run_minimal(&["--initrd", empty.arg()]),
        "the initrd is empty",
    );
    assert_clean_failure(
        &run_minimal(&["--cmdline", "console=ttyS0\tquiet"]),
        "'\\t' at position 13",
    );
}

#[test]
fn a_disk_write_the_host_refuses_is_an_ioerr_for_the_guest_and_a_warning_for_the_operator() {
    require_kvm();
    // A 1 MiB tmpfs, filled up, holding a sparse image: the guest's writes
    // find no room (ENOSPC). In a mount namespace of its own, so nothing is
    // left mounted whatever happens.
    let dir = TempFile::new("anchor", b"");
    let mnt = dir.path.parent().expect("dir").join("full");
    std::fs::create_dir(&mnt).expect("mount point");
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m} && \
         truncate -s 4M {m}/disk.img && \
         (dd if=/dev/zero of={m}/filler bs=64k 2>/dev/null; true) && \
         exec {vmm} --disk {m}/disk.img --cmdline 'testguest.run=blk testguest.exit_port=0xf4'",
        m = mnt.display(),
        vmm = minimal_bin().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .env("RUST_LOG", "warn")
        .output()
        .expect("unshare (util-linux) runs the VMM in a mount namespace");
    let err = stderr(&out);
    assert!(
        err.contains("of the image failed: No space left on device"),
        "the operator is told: {err}"
    );
    assert!(
        stdout(&out).contains("error blk"),
        "the guest got IOERR: {}",
        stdout(&out)
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn console_and_serial_destinations_that_make_no_sense_are_usage_errors() {
    for args in [
        ["--serial", "tty"],
        ["--serial", "file="],
        ["--serial", "file=,append"],
        ["--serial", "pty=x"],
        ["--console", "file="],
        ["--console", "stdin"],
    ] {
        let out = run_minimal(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("invalid value"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"));
    }
    let dir = TempFile::new("anchor", b"");
    let parent = dir.path.parent().expect("dir").to_str().expect("utf-8");
    assert_clean_failure(
        &run_minimal(&["--serial", &format!("file={parent}")]),
        "is a directory",
    );
    assert_clean_failure(
        &run_minimal(&["--serial", "file=/nonexistent/dir/serial.log"]),
        "cannot open serial output",
    );
}
