//! Jail mode end to end, as root: the VMM runs as an unprivileged user in
//! its own namespaces, on a root holding only what the VM needs, inside a
//! cgroup with the limits asked for, with no descriptor it was not meant to
//! have; it is managed over its API socket from the host, and leaves
//! nothing behind.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{minimal_bin, require_kvm, TempFile};

const NOBODY: u32 = 65534;

fn call(sock: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("answer");
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The cgroup directory of `pid` for `controller`, on whichever hierarchy
/// holds it.
fn cgroup_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in cg.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        let v1 = ctrls.split(',').any(|c| c == controller);
        let v2 = ctrls.is_empty();
        for m in info.lines() {
            let (left, right) = m.split_once(" - ")?;
            let mnt = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1).unwrap_or("");
            let ok = (v1 && fstype == "cgroup" && opts.split(',').any(|o| o == controller))
                || (v2 && fstype == "cgroup2");
            let dir = Path::new(mnt).join(path.trim_start_matches('/'));
            if ok && path.contains("vmm-kit") && dir.exists() {
                return Some(dir);
            }
        }
    }
    None
}

#[test]
fn a_jailed_vmm_runs_confined_is_managed_from_the_host_and_leaves_nothing() {
    require_kvm();
    let kernel = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = kernel.path.parent().expect("dir").to_path_buf();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::os::unix::fs::chown(&disk, Some(NOBODY), Some(NOBODY)).expect("chown disk");
    let secret = dir.join("secret");
    std::fs::write(&secret, b"not for the guest").expect("secret");
    let leaked = std::fs::File::open(&secret).expect("open secret");
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let serial = dir.join("serial.txt");
    let sock = dir.join("api.sock");
    let base = dir.join("jails");
    let id = format!("test-{}", std::process::id());

    let mut cmd = Command::new(minimal_bin());
    cmd.args(["--jail", &id, "--jail-uid", "65534", "--jail-gid", "65534"])
        .arg("--jail-base")
        .arg(&base)
        .args(["--jail-memory", "1G", "--jail-cpus", "1.5"])
        .args(["--kernel", kernel.arg()])
        .arg("--disk")
        .arg(&disk)
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .arg("--api-sock")
        .arg(&sock)
        .args(["--cmdline", "console=ttyS0 testguest.run=hello,blk,spin"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec, only dup2 on descriptors this process
    // holds: the launcher inherits one descriptor it was never meant to
    // pass on.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leaked_fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut launcher = cmd.spawn().expect("start the launcher");
    wait_for("the API socket", || UnixStream::connect(&sock).is_ok());
    assert_eq!(
        call(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        ),
        204
    );
    wait_for("the guest to spin", || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("testguest: spin"))
    });
    let text = std::fs::read_to_string(&serial).expect("serial");
    assert!(
        text.contains("write=ok flush=ok read=ok"),
        "disk I/O in the jail: {text}"
    );

    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id()))
        .expect("children");
    let vmm: u32 = children.trim().parse().expect("one child: the jailed VMM");

    // An unprivileged user, no way back.
    assert_eq!(status_field(vmm, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(vmm, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(vmm, "Groups"), "");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    assert_eq!(status_field(vmm, "Seccomp"), "2", "filtered");
    // PID 1 of its own PID namespace; its own mount, network, IPC and UTS.
    assert!(
        status_field(vmm, "NSpid").ends_with("\t1"),
        "{}",
        status_field(vmm, "NSpid")
    );
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "{ns} namespace shared with the host");
    }
    // No descriptor it was not meant to have.
    for fd in std::fs::read_dir(format!("/proc/{vmm}/fd")).expect("fds") {
        let target = std::fs::read_link(fd.expect("fd").path()).unwrap_or_default();
        assert_ne!(
            target, secret,
            "the launcher's leaked descriptor reached the VMM"
        );
    }
    // A root holding only the devices and the files the VM needs.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .expect("root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    // The devices, the files' directory and the working directory (empty,
    // so that relative paths resolve as outside).
    let top_of = |p: &Path| {
        p.components()
            .nth(1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
    };
    let mut want: Vec<String> = ["dev".to_string()]
        .into_iter()
        .chain(top_of(&dir))
        .chain(top_of(&std::env::current_dir().expect("cwd")))
        .collect();
    want.sort();
    want.dedup();
    assert_eq!(top, want);
    let inside = root.join(dir.strip_prefix("/").expect("absolute"));
    let mut files: Vec<String> = std::fs::read_dir(&inside)
        .expect("the directory inside")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["disk.img", "guest.elf", "serial.txt"],
        "no secret, no socket"
    );
    assert_eq!(
        std::fs::metadata(root.join("dev/kvm"))
            .expect("/dev/kvm")
            .uid(),
        NOBODY
    );
    // The cgroup limits.
    let mem = cgroup_dir(vmm, "memory").expect("a memory cgroup of the jail");
    let limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(mem.join(f)).ok())
        .expect("memory limit file");
    assert_eq!(limit.trim(), "1073741824");
    let cpu = cgroup_dir(vmm, "cpu").expect("a cpu cgroup of the jail");
    let quota = std::fs::read_to_string(cpu.join("cpu.max"))
        .or_else(|_| std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")))
        .expect("cpu quota");
    assert!(quota.starts_with("150000"), "{quota}");

    // Managed from the host: pause and resume over the socket.
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#), 204);
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#), 204);
    // A signal to the launcher reaches the VMM, which stops in order.
    // SAFETY: sending SIGTERM to the child this test started.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = launcher.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the launcher did not end");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    let _ = launcher
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{err}");
    assert!(!base.join(&id).exists(), "the jail directory is removed");
    assert!(!mem.exists() && !cpu.exists(), "the cgroups are removed");
    assert!(!sock.exists(), "the socket is removed");
    let written = std::fs::read(&disk).expect("disk");
    assert!(
        written.iter().any(|&b| b != 0),
        "the guest's write reached the image"
    );
    drop(leaked);
}

#[test]
fn a_jailed_vmm_boots_from_a_config_file_and_writes_its_log_inside() {
    require_kvm();
    let kernel = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = kernel.path.parent().expect("dir").to_path_buf();
    let log = dir.join("vmm.log");
    let metrics = dir.join("metrics.json");
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}",
             "boot_args": "console=ttyS0 testguest.run=hello,exit testguest.exit=9"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 96}},
            "logger": {{"log_path": "{}", "level": "Info"}},
            "metrics": {{"metrics_path": "{}"}}}}"#,
        kernel.arg(),
        log.display(),
        metrics.display()
    );
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, config).expect("config");
    let out = Command::new(minimal_bin())
        .args(["--jail", &format!("cfg-{}", std::process::id())])
        .args(["--jail-uid", "65534", "--jail-gid", "65534"])
        .arg("--jail-base")
        .arg(dir.join("jails"))
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(18),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("mem_mib=96"), "{text}");
    // The outputs were made for the jail's user and written from inside.
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("guest ended"), "{logged}");
    assert_eq!(std::fs::metadata(&log).expect("log").uid(), NOBODY);
    let lines = std::fs::read_to_string(&metrics).expect("metrics");
    assert!(lines.contains("\"uart\""), "{lines}");
}

#[test]
fn a_jail_is_refused_with_a_reason() {
    let base = TempFile::new("x", b"");
    let b = base.path.parent().expect("dir").join("jails");
    let run = |extra: &[&str]| {
        Command::new(minimal_bin())
            .arg("--jail-base")
            .arg(&b)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    let cases: [(&[&str], &str); 4] = [
        (
            &["--jail", "a", "--jail-uid", "0", "--jail-gid", "1"],
            "must not be 0",
        ),
        (
            &["--jail", "../up", "--jail-uid", "1", "--jail-gid", "1"],
            "jail id",
        ),
        (
            &[
                "--jail",
                "a",
                "--jail-uid",
                "1",
                "--jail-gid",
                "1",
                "--jail-io",
                "sda 5",
            ],
            "--jail-io",
        ),
        (
            &[
                "--jail",
                "a",
                "--jail-uid",
                "1",
                "--jail-gid",
                "1",
                "--disk",
                "/no/such.img",
            ],
            "/no/such.img",
        ),
    ];
    for (args, want) in cases {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!b.join("a").exists(), "{args:?} left a jail behind");
    }
    let out = run(&["--jail", "a"]);
    assert_eq!(out.status.code(), Some(3), "uid and gid are required");
    std::fs::create_dir_all(b.join("busy")).expect("dir");
    let out = run(&["--jail", "busy", "--jail-uid", "1", "--jail-gid", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists"), "{err}");
    assert!(b.join("busy").exists(), "someone else's jail is left alone");
}
