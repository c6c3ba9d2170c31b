//! Helpers shared by the end-to-end tests.

#![allow(dead_code)]

pub mod api;
pub mod netns;

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fails the test, loudly, when `/dev/kvm` cannot be used: these tests boot
/// real guests and must not pass by skipping.
pub fn require_kvm() {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!(
            "/dev/kvm cannot be opened ({e}): the end-to-end tests boot guests under KVM and need it. \
             Run them on a host with KVM enabled and access to /dev/kvm."
        );
    }
}

/// The process status the reference VMM reports for guest status `n`.
pub fn guest_status(n: u8) -> Option<i32> {
    Some(i32::from(vmm_kit::core::exit_status::guest(n)))
}

/// The reference VMM binary, built by `cargo test` beside the test binaries.
pub fn minimal_bin() -> PathBuf {
    example_bin("minimal")
}

/// An example's binary, built by `cargo test` beside the test binaries.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/minimal
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile directory");
    let bin = dir.join("examples").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test` (which builds the examples)",
        bin.display()
    );
    bin
}

/// Runs the reference VMM with `args`, stdin closed.
pub fn run_minimal(args: &[&str]) -> Output {
    run_minimal_logging(args, "warn")
}

/// Runs the reference VMM with `args` and `RUST_LOG=filter`, stdin closed.
pub fn run_minimal_logging(args: &[&str], filter: &str) -> Output {
    Command::new(minimal_bin())
        .args(args)
        .stdin(Stdio::null())
        .env("RUST_LOG", filter)
        .output()
        .expect("cannot start the reference VMM")
}

/// Starts `cmd` (the reference VMM, usually) with stdin closed, `RUST_LOG`
/// at `warn` and its stdout lines on a channel, as they come.
pub fn spawn_lines(mut cmd: Command) -> (Child, Receiver<String>) {
    require_kvm();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the reference VMM");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Lines up to (and with) the first containing `needle`.
pub fn wait_line(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no {needle:?}; output so far:\n{}", seen.join("\n")),
        }
    }
}

/// Waits for the VMM to exit: its status code and its stderr, with the rest
/// of its stdout added to `seen`.
pub fn finish(mut child: Child, rx: &Receiver<String>, seen: &mut Vec<String>) -> (i32, String) {
    let status = child.wait().expect("wait for the VMM");
    seen.extend(rx.try_iter());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).ok();
    }
    (status.code().unwrap_or(-1), err)
}

/// Runs the reference VMM with `args` like [`run_minimal`], and also returns
/// each line of its stdout with the time it arrived, counted from the start:
/// for tests that time what the guest does apart from the process starting
/// and stopping.
pub fn run_minimal_timed(args: &[&str]) -> (Output, Vec<(Duration, String)>) {
    let start = Instant::now();
    let mut cmd = Command::new(minimal_bin());
    cmd.args(args);
    let (mut child, rx) = spawn_lines(cmd);
    let lines: Vec<(Duration, String)> = rx.iter().map(|l| (start.elapsed(), l)).collect();
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let status = child.wait().expect("the reference VMM");
    let stdout = lines
        .iter()
        .flat_map(|(_, l)| format!("{l}\n").into_bytes())
        .collect();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        lines,
    )
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that the run failed with a clear message containing `needle`,
/// without a panic.
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        o.status.code().is_some(),
        "killed by a signal: {:?}",
        o.status
    );
    assert!(!err.contains("panicked"), "the VMM panicked: {err}");
    assert!(err.contains("error: "), "no error line: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

/// A minimal x86_64 ELF executable with one PT_LOAD of `code` at `paddr`.
pub fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    vmm_kit::boot::test_utils::tiny_elf(paddr, code, code.len() as u64, None)
}

/// A file in a fresh temporary directory, removed with the directory.
pub struct TempFile {
    dir: PathBuf,
    /// The file's path.
    pub path: PathBuf,
}

impl TempFile {
    /// Writes `data` to a new temporary file named `name`.
    pub fn new(name: &str, data: &[u8]) -> TempFile {
        let dir = std::env::temp_dir().join(format!(
            "vmm-kit-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, data).expect("temp file");
        TempFile { dir, path }
    }

    /// The path as a string.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `Write` (a guest's serial output, say) whose bytes the test reads while
/// the guest runs.
#[derive(Clone, Default)]
pub struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("buffer")).into_owned()
    }

    /// Waits until `needle` has been written, failing after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} within {timeout:?}; output: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
