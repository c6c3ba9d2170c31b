//! The seccomp filters stop what a thread has no business doing, and let it
//! do its job. Each case runs in a child process (this test binary started
//! again), since a blocked call ends the whole process.

use std::process::Command;

use vmm_kit::core::seccomp::{program, spawn_confined, ThreadKind};
use vmm_kit::vmm_sys_util::eventfd::EventFd;

const CHILD_ENV: &str = "VMM_KIT_SECCOMP_CHILD";

fn kind_named(name: &str) -> ThreadKind {
    match name {
        "vcpu" => ThreadKind::Vcpu,
        "event-loop" => ThreadKind::EventLoop,
        "input" => ThreadKind::Input,
        _ => ThreadKind::Main,
    }
}

/// In the child: a confined thread first does allowed work (an eventfd round
/// trip), then the forbidden call `what`.
fn child(kind: &str, what: &str) -> ! {
    let evt = EventFd::new(0).expect("eventfd");
    let what = what.to_string();
    let filter = program(kind_named(kind)).expect("filter");
    let h = spawn_confined("confined".into(), Some(filter), move || {
        evt.write(5).expect("eventfd write is allowed");
        assert_eq!(evt.read().expect("eventfd read is allowed"), 5);
        eprintln!("allowed calls passed");
        // SAFETY: plain system calls with valid arguments; the filter is
        // expected to stop them before they do anything.
        unsafe {
            match what.as_str() {
                "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0),
                "openat" => libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY),
                "execve" => libc::execv(c"/bin/true".as_ptr(), [std::ptr::null()].as_ptr()),
                _ => libc::ioctl(0, libc::TIOCGWINSZ),
            }
        }
    })
    .expect("spawn");
    let _ = h.join();
    // Reaching this point means the call went through.
    std::process::exit(0)
}

fn run_child(test: &str, kind: &str, what: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{kind}:{what}"))
        .output()
        .expect("start the child")
}

fn maybe_child() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (kind, what) = spec.split_once(':').expect("kind:call");
        child(kind, what);
    }
}

#[test]
fn forbidden_calls_end_the_process_with_sigsys_status_and_a_message() {
    maybe_child();
    let cases = [
        ("event-loop", "socket", 41),
        ("event-loop", "openat", 257),
        ("vcpu", "execve", 59),
        ("vcpu", "ioctl-tty", 16),
        ("input", "socket", 41),
        ("main", "openat", 257),
    ];
    for (kind, what, nr) in cases {
        let out = run_child(
            "forbidden_calls_end_the_process_with_sigsys_status_and_a_message",
            kind,
            what,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("allowed calls passed"), "{kind}/{what}: {err}");
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGSYS),
            "{kind}/{what}: {err}"
        );
        assert!(
            err.contains(&format!("seccomp blocked system call {nr};")),
            "{kind}/{what}: {err}"
        );
    }
}
