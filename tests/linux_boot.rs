//! Boots a real Linux kernel with the reference VMM, where one is given:
//!
//! - `VMM_KIT_LINUX_KERNEL`: a `vmlinux` or bzImage (`scripts/linux-guest.sh`
//!   builds one from Debian packages);
//! - `VMM_KIT_LINUX_INITRD`: an initrd (optional);
//! - `VMM_KIT_LINUX_EXPECT`: text the serial console must show (default
//!   `Linux version`);
//! - `VMM_KIT_LINUX_TIMEOUT_SECS`: how long to wait (default 900: on hosts
//!   where guest kernel code is emulated, Linux takes minutes).
//!
//! Without `VMM_KIT_LINUX_KERNEL` the test says so and does nothing.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{minimal_bin, require_kvm};

#[test]
fn linux_kernel_boots_to_its_console() {
    let Some(kernel) = std::env::var_os("VMM_KIT_LINUX_KERNEL") else {
        eprintln!(
            "linux_kernel_boots_to_its_console: SKIPPED, no kernel given \
             (set VMM_KIT_LINUX_KERNEL, see scripts/linux-guest.sh)"
        );
        return;
    };
    require_kvm();
    let expect = std::env::var("VMM_KIT_LINUX_EXPECT").unwrap_or_else(|_| "Linux version".into());
    let timeout = std::env::var("VMM_KIT_LINUX_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(900), Duration::from_secs);
    let mut cmd = Command::new(minimal_bin());
    cmd.arg("--kernel").arg(&kernel).args(["--mem", "512"]);
    cmd.args([
        "--cmdline",
        "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 rdinit=/init",
    ]);
    if let Some(initrd) = std::env::var_os("VMM_KIT_LINUX_INITRD") {
        cmd.arg("--initrd").arg(initrd);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the reference VMM");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut console = Vec::new();
    let found = loop {
        if String::from_utf8_lossy(&console).contains(&expect) {
            break true;
        }
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(chunk) => console.extend_from_slice(&chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if left > Duration::ZERO => {}
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let status = child.wait().expect("wait");
    assert!(
        found,
        "{expect:?} not seen within {timeout:?} (VMM status {status:?}); console:\n{}",
        String::from_utf8_lossy(&console)
    );
}
