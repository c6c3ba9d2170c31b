//! Network namespaces for the network tests: each test makes its own, with
//! a TAP (`tap0`, 172.16.0.1/24, up) for the guest, and removes it when done.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;

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
    let mut cmd = ns.command(&super::minimal_bin());
    cmd.args(args);
    super::spawn_lines(cmd)
}
