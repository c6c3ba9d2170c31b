//! Network namespaces for the network tests: each test makes its own
//! ([`NetNs`]), with a TAP (`tap0` at [`HOST_IP`]/24, up) for the guest, and
//! removes it when done.

use std::process::Child;
use std::sync::mpsc::Receiver;

pub use vmm_kit::devices::test_utils::NetNs;

/// The host's address on the TAP.
pub const HOST_IP: &str = "172.16.0.1";
/// The guest's address (the test guest's default).
pub const GUEST_IP: &str = "172.16.0.2";
/// The MAC the tests give the guest.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// The reference VMM in `ns` with `args`, its stdout lines on a channel.
pub fn spawn_in(ns: &NetNs, args: &[&str]) -> (Child, Receiver<String>) {
    let mut cmd = ns.command(&super::minimal_bin());
    cmd.args(args);
    super::spawn_lines(cmd)
}
