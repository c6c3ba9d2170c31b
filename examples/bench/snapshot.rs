//! Snapshot figures, on the test guest's `touch` scenario (which writes
//! every 4 KiB page of its RAM above 8 MiB, so that the snapshot carries
//! that much data, then waits for a byte on COM1, marks the moment with `!`
//! on the debug console and writes every page again):
//!
//! - creation: the paused VM to durable files (ours: `PUT /snapshot/create`;
//!   QEMU: `migrate` to a file through `exec:cat`, until it completes);
//! - restore: process start to the guest's next instruction (the `!` it
//!   writes on its first loop turn; ours: `--restore`, lazy or eager; QEMU:
//!   `-incoming` from the migration file, then `cont` over QMP) against the
//!   floor's process start to the end of a one-instruction VM; and the
//!   `PUT /snapshot/load` call alone (what Firecracker's own figure times);
//! - the first write to a page: on fresh RAM (a cold boot) and after a
//!   restore, in TSC cycles, against the host writing to fresh anonymous
//!   memory and to a private mapping of the same memory file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{minimal_bin, qemu_command_mem, qmp_ready};

/// What one save-and-restore round gave.
pub struct Round {
    /// Creation, ms.
    pub create_ms: f64,
    /// Process start to the guest's next instruction, ms.
    pub restore_ms: f64,
    /// First write to a page on fresh RAM, cycles.
    pub cold_cycles: f64,
    /// First write to a page after the restore, cycles.
    pub restored_cycles: f64,
}

/// A scratch directory, removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmm-kit-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch directory");
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads `out` until a line containing `needle`; returns that line.
fn line_with(out: &mut BufReader<ChildStdout>, needle: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("read the guest's output") == 0 {
            panic!("the VMM ended before printing {needle:?}");
        }
        if line.contains(needle) {
            return line;
        }
    }
}

fn cycles_in(line: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("cycles_per_page="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cycles_per_page in {line:?}"))
}

/// Reads `err` until the guest's `!` marker.
fn wait_marker(err: &mut impl Read) {
    let mut byte = [0u8; 1];
    loop {
        err.read_exact(&mut byte).expect("the restore marker");
        if byte[0] == b'!' {
            return;
        }
    }
}

/// One HTTP request to our API; the status.
fn http(sock: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(sock).expect("connect to the API");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("answer");
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {resp:?}"))
}

fn wait_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn spawn_piped(cmd: &mut Command) -> (Child, BufReader<ChildStdout>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "error")
        .spawn()
        .expect("start the VMM");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (child, out)
}

/// Boots `touch` with `mem_mib` MiB under our VMM and snapshots it into
/// `dir`; returns the creation time and the cold cycles per page.
fn ours_save(dir: &Scratch, image: &Path, mem_mib: u64) -> (f64, f64) {
    let sock = dir.path("boot.sock");
    let mem = mem_mib.to_string();
    let (mut child, mut out) = spawn_piped(Command::new(minimal_bin()).args([
        "--api-sock",
        sock.to_str().expect("utf-8"),
        "--kernel",
        image.to_str().expect("utf-8"),
        "--debugcon",
        "--mem",
        &mem,
        "--cmdline",
        "testguest.run=touch",
    ]));
    wait_socket(&sock);
    let body = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(http(&sock, "PUT", "/actions", body), 204);
    let cold = cycles_in(&line_with(&mut out, "touch phase=cold"));
    line_with(&mut out, "touch ready");
    assert_eq!(http(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#), 204);
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.path("vm.state").display(),
        dir.path("vm.mem").display()
    );
    let t = Instant::now();
    assert_eq!(http(&sock, "PUT", "/snapshot/create", &create), 204);
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    (create_ms, cold)
}

/// Restores the snapshot in `dir` with `--restore` (lazily, or eagerly);
/// returns process start to the guest's next instruction and the restored
/// cycles per page.
fn ours_restore(dir: &Scratch, eager: bool) -> (f64, f64) {
    let mut cmd = Command::new(minimal_bin());
    cmd.arg("--restore")
        .arg(dir.path("vm.state"))
        .arg("--restore-memory")
        .arg(dir.path("vm.mem"));
    if eager {
        cmd.arg("--restore-eager");
    }
    let t = Instant::now();
    let (child, mut out) = spawn_piped(&mut cmd);
    // Waits in the pipe until the restored VM's serial input starts.
    go_and_measure(child, &mut out, t)
}

/// Sends the restored guest the byte it waits for; returns the time from
/// `t` to its marker, and the cycles per page it then reports.
fn go_and_measure(mut child: Child, out: &mut BufReader<ChildStdout>, t: Instant) -> (f64, f64) {
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"g")
        .expect("the byte the guest waits for");
    wait_marker(child.stderr.as_mut().expect("stderr"));
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    let restored = cycles_in(&line_with(out, "touch phase=restored"));
    let _ = child.kill();
    let _ = child.wait();
    (restore_ms, restored)
}

/// A whole round under our VMM.
pub fn ours(image: &Path, mem_mib: u64, eager: bool) -> Round {
    let dir = Scratch::new("snap");
    let (create_ms, cold_cycles) = ours_save(&dir, image, mem_mib);
    let (restore_ms, restored_cycles) = ours_restore(&dir, eager);
    Round {
        create_ms,
        restore_ms,
        cold_cycles,
        restored_cycles,
    }
}

/// `PUT /snapshot/load` with `resume_vm` on a fresh VMM, the call alone, in
/// ms (the snapshot is made first, untimed).
pub fn ours_load_call(image: &Path, mem_mib: u64) -> f64 {
    let dir = Scratch::new("load");
    ours_save(&dir, image, mem_mib);
    let sock = dir.path("load.sock");
    let (mut child, _out) = spawn_piped(
        Command::new(minimal_bin()).args(["--api-sock", sock.to_str().expect("utf-8")]),
    );
    wait_socket(&sock);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        dir.path("vm.state").display(),
        dir.path("vm.mem").display()
    );
    let t = Instant::now();
    assert_eq!(http(&sock, "PUT", "/snapshot/load", &load), 204);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    ms
}

/// One QMP command; waits for its answer (skipping events); true on
/// `return`.
fn qmp(s: &mut UnixStream, r: &mut BufReader<UnixStream>, cmd: &str) -> (bool, String) {
    s.write_all(cmd.as_bytes()).expect("QMP write");
    s.write_all(b"\n").expect("QMP write");
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).expect("QMP read") == 0 {
            panic!("QMP closed");
        }
        if line.starts_with("{\"return\"") {
            return (true, line);
        }
        if line.starts_with("{\"error\"") {
            return (false, line);
        }
    }
}

fn qmp_connect(sock: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            if let Some(r) = qmp_ready(&mut s) {
                return (s, r);
            }
        }
        assert!(Instant::now() < deadline, "no QMP at {}", sock.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn qemu_touch(image: &PathBuf, mem: &str, sock: &Path, extra: &[&str]) -> Command {
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec![
        "-qmp",
        &qmp_arg,
        "-chardev",
        "file,id=dbg,path=/dev/stderr",
        "-device",
        "isa-debugcon,iobase=0xe9,chardev=dbg",
    ];
    args.extend_from_slice(extra);
    qemu_command_mem("microvm,acpi=off", image, "testguest.run=touch", mem, &args)
}

/// A whole round under QEMU: migrate to a file, then `-incoming` from it.
pub fn qemu(image: &PathBuf, mem_mib: u64) -> Round {
    let dir = Scratch::new("qemu");
    let mem = mem_mib.to_string();
    let sock = dir.path("boot.qmp");
    let (mut child, mut out) = spawn_piped(&mut qemu_touch(image, &mem, &sock, &[]));
    let cold_cycles = cycles_in(&line_with(&mut out, "touch phase=cold"));
    line_with(&mut out, "touch ready");
    let (mut s, mut r) = qmp_connect(&sock);
    assert!(qmp(&mut s, &mut r, r#"{"execute":"stop"}"#).0);
    let file = dir.path("vm.mig");
    let migrate = format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        file.display()
    );
    let t = Instant::now();
    assert!(qmp(&mut s, &mut r, &migrate).0);
    loop {
        let (_, status) = qmp(&mut s, &mut r, r#"{"execute":"query-migrate"}"#);
        if status.contains("\"completed\"") {
            break;
        }
        assert!(
            !status.contains("\"failed\""),
            "QEMU migration failed: {status}"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    let sock = dir.path("restore.qmp");
    let incoming = format!("exec:cat {}", file.display());
    let t = Instant::now();
    let (child, mut out) = spawn_piped(&mut qemu_touch(
        image,
        &mem,
        &sock,
        &["-S", "-incoming", &incoming],
    ));
    let (mut s, mut r) = qmp_connect(&sock);
    // QEMU accepts `cont` while loading, but runs only if it came after
    // the load: wait for the load, then continue.
    loop {
        let (_, status) = qmp(&mut s, &mut r, r#"{"execute":"query-status"}"#);
        if !status.contains("inmigrate") {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(qmp(&mut s, &mut r, r#"{"execute":"cont"}"#).0);
    let (restore_ms, restored_cycles) = go_and_measure(child, &mut out, t);
    Round {
        create_ms,
        restore_ms,
        cold_cycles,
        restored_cycles,
    }
}

/// The host's own first write to each 4 KiB page of `len` bytes of fresh
/// anonymous memory, or of a private mapping of `file`, past the first
/// 8 MiB (as the guest's `touch`), in TSC cycles per page.
pub fn host_touch_cycles(len: usize, file: Option<&std::fs::File>) -> f64 {
    let (flags, fd) = match file {
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        ),
        Some(f) => (libc::MAP_PRIVATE | libc::MAP_NORESERVE, f.as_raw_fd()),
    };
    // SAFETY: a new mapping of `len` bytes that nothing else refers to;
    // unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    let base = p.cast::<u64>();
    let pages = len / 4096;
    let skip = (8 << 20) / 4096;
    // SAFETY: rdtsc has no side effects.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    for i in skip..pages {
        // SAFETY: inside the mapping made above.
        unsafe { std::ptr::write_volatile(base.add(i * 512), i as u64) };
    }
    // SAFETY: as above.
    let cycles = unsafe { core::arch::x86_64::_rdtsc() } - start;
    // SAFETY: the mapping made above, not used after this.
    unsafe { libc::munmap(p, len) };
    cycles as f64 / (pages - skip) as f64
}

/// The memory file of a fresh snapshot of a `mem_mib` guest, for the floor
/// (made untimed).
pub fn memory_file(image: &Path, mem_mib: u64) -> (Scratch, std::fs::File) {
    let dir = Scratch::new("floor");
    ours_save(&dir, image, mem_mib);
    let f = std::fs::File::open(dir.path("vm.mem")).expect("memory file");
    (dir, f)
}
