//! Network namespaces for the network tests: each test makes its own, with
//! a TAP (`tap0`, 172.16.0.1/24, up) for the guest, and removes it when done.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The host's address on the TAP.
pub const HOST_IP: &str = "172.16.0.1";
/// The guest's address (the test guest's default).
pub const GUEST_IP: &str = "172.16.0.2";
/// The MAC the tests give the guest.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("the network tests need iproute2's `ip` (apt-get install iproute2): {e}")
        });
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of the test's own, removed on drop.
pub struct NetNs {
    /// Its name (under /var/run/netns).
    pub name: String,
}

impl NetNs {
    /// A namespace with `lo` up and `tap0` at [`HOST_IP`]/24, up.
    pub fn new(tag: &str) -> NetNs {
        NetNs::with_tap(tag, "tap0")
    }

    /// A namespace with `lo` up and the TAP `tap` at [`HOST_IP`]/24, up.
    pub fn with_tap(tag: &str, tap: &str) -> NetNs {
        let name = format!("vmmkit-{tag}-{}", std::process::id());
        // A namespace left by an earlier, killed run.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.add_tap(tap, HOST_IP);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Another TAP in the namespace, at `addr`/24, up.
    pub fn add_tap(&self, tap: &str, addr: &str) {
        ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes, and
    /// TAPs a VM built there opens, belong to the namespace).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("the namespace's file");
                // SAFETY: setns on an open namespace fd; affects this thread.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The reference VMM in `ns` with `args`, its stdout lines on a channel.
pub fn spawn_in(ns: &NetNs, args: &[&str]) -> (Child, Receiver<String>) {
    super::require_kvm();
    let mut child = ns
        .command(&super::minimal_bin())
        .args(args)
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
