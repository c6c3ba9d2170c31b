//! A plain HTTP/1.1 client of the reference VMM's API socket, and the VMM
//! serving it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{minimal_bin, require_kvm, TempFile};

/// One request on a fresh connection; the status and the body.
pub fn call(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("test step");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("test step");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read the answer");
    parse_response(&resp)
}

pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

pub fn fault(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {body}"))
        .to_string()
}

pub fn state(sock: &Path) -> String {
    let (code, body) = call(sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("test step");
    v["state"].as_str().expect("test step").to_string()
}

/// The reference VMM serving the API, its serial output in a file.
pub struct Vmm {
    /// The process.
    pub child: Child,
    /// Its API socket.
    pub sock: PathBuf,
    /// Its serial output file.
    pub serial: PathBuf,
    /// The temporary directory (with the test guest as `guest.elf`), if
    /// this VMM made it.
    dir: Option<TempFile>,
    base: PathBuf,
}

impl Vmm {
    /// Starts the VMM serving the API, with `extra` flags, in a new
    /// temporary directory.
    pub fn start(extra: &[&str]) -> Vmm {
        let dir = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
        let base = dir.path.parent().expect("test step").to_path_buf();
        let mut vmm = Vmm::start_in(&base, "vmm", extra);
        vmm.dir = Some(dir);
        vmm
    }

    /// Starts the VMM serving the API on `base/NAME.sock`, its serial output
    /// in `base/NAME.serial`, with `extra` flags.
    pub fn start_in(base: &Path, name: &str, extra: &[&str]) -> Vmm {
        Vmm::launch(base, name, extra, None)
    }

    /// As [`Vmm::start_in`], inside the network namespace `netns`.
    pub fn start_in_ns(base: &Path, name: &str, extra: &[&str], netns: &str) -> Vmm {
        Vmm::launch(base, name, extra, Some(netns))
    }

    /// As [`Vmm::start`], inside the network namespace `netns`.
    pub fn start_in_netns(netns: &str, extra: &[&str]) -> Vmm {
        let dir = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
        let base = dir.path.parent().expect("test step").to_path_buf();
        let mut vmm = Vmm::launch(&base, "vmm", extra, Some(netns));
        vmm.dir = Some(dir);
        vmm
    }

    fn launch(base: &Path, name: &str, extra: &[&str], netns: Option<&str>) -> Vmm {
        require_kvm();
        let sock = base.join(format!("{name}.sock"));
        let serial = base.join(format!("{name}.serial"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(minimal_bin());
                c
            }
            None => Command::new(minimal_bin()),
        };
        let child = command
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the reference VMM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API socket never came up (has the VMM ended? {:?})",
                std::fs::metadata(&sock).err()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm {
            child,
            sock,
            serial,
            dir: None,
            base: base.to_path_buf(),
        }
    }

    /// The test guest's path.
    pub fn kernel(&self) -> String {
        self.base.join("guest.elf").display().to_string()
    }

    /// A path in the temporary directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    /// Waits for `needle` in the serial output.
    pub fn wait_serial(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the serial output: {text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the end; the status and stderr.
    pub fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("test step") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the VMM did not end");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
