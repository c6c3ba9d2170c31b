//! Jail mode (`--jail ID`): before it touches anything else the VMM isolates
//! itself, as Firecracker's jailer isolates Firecracker, then runs as an
//! unprivileged user.
//!
//! The launching process (root) stays outside: it creates the jail's cgroup
//! with the limits asked for, forks the VMM into new PID, mount, IPC, UTS and
//! network namespaces (or a given network namespace), relays SIGINT, SIGTERM
//! and SIGHUP to it, ends as it ends, and removes the cgroup and the jail
//! directory afterwards. The VMM, PID 1 of its namespace, mounts a small
//! tmpfs as its new root holding only `/dev/kvm`, `/dev/net/tun`,
//! `/dev/null`, `/dev/urandom` and the files named on its command line or
//! in its config file (bind-mounted at the same paths, read-only unless
//! written), pivots into it and remounts it read-only, closes every file
//! descriptor but stdio and the API socket, and drops to `--jail-uid` /
//! `--jail-gid` with no supplementary groups and no way back
//! (`PR_SET_NO_NEW_PRIVS`, not dumpable). Paths given later over the API
//! must be inside the jail (`--jail-bind` adds any).

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Where jails are made unless `--jail-base` says otherwise.
pub const DEFAULT_BASE: &str = "/srv/vmm-kit";

/// The period CPU quotas are expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// A file the jail shows the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Its path, absolute, the same inside and outside.
    pub path: PathBuf,
    /// Whether the VMM may write it.
    pub writable: bool,
    /// An output the VMM creates: made (owned by the jail's user) if
    /// missing, so that it can be shown.
    pub output: bool,
}

/// What the jail is made of.
#[derive(Clone, Debug)]
pub struct JailSpec {
    /// The jail's name: its directory and cgroup are named after it.
    pub id: String,
    /// The user the VMM runs as.
    pub uid: u32,
    /// The group the VMM runs as.
    pub gid: u32,
    /// The directory jails are made in.
    pub base: PathBuf,
    /// A network namespace to join instead of a new, empty one.
    pub netns: Option<PathBuf>,
    /// CPU time, in CPUs (1.5: one and a half CPUs' worth).
    pub cpus: Option<f64>,
    /// Memory, in bytes (guest RAM counts once touched).
    pub memory: Option<u64>,
    /// I/O limits, `MAJ:MIN rbps=N wbps=N riops=N wiops=N` each.
    pub io: Vec<String>,
    /// The files to show the VMM.
    pub binds: Vec<Bind>,
    /// A descriptor to keep open in the jail (the API socket); it becomes
    /// descriptor 3.
    pub keep_fd: Option<RawFd>,
}

/// Which side of the fork this is.
pub enum Role {
    /// The launcher, after the jailed VMM ended: its wait status.
    Launcher(i32),
    /// The jailed VMM: carry on (the kept descriptor, if any, is 3).
    Jailed,
}

/// Why the jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Not root.
    #[error("--jail needs root: it makes namespaces, a chroot and cgroups, then drops to --jail-uid/--jail-gid")]
    NotRoot,
    /// The VMM would run as root.
    #[error("--jail-uid and --jail-gid must not be 0: the jail's point is an unprivileged user")]
    RootUser,
    /// A bad jail id.
    #[error("jail id {0:?}: 1-64 letters, digits, - and _")]
    BadId(String),
    /// The jail exists.
    #[error("{0} exists: another VMM may be running in a jail of that id (remove it if not)")]
    InUse(PathBuf),
    /// A file to show the VMM is not there.
    #[error("cannot show {path} in the jail: {source}")]
    Bind {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bad limit.
    #[error("{0}")]
    Limit(String),
    /// The host has no cgroup hierarchy with the controllers the limits
    /// need.
    #[error("no cgroup hierarchy on this host offers the {0} controller")]
    NoController(&'static str),
    /// A step failed.
    #[error("jail: {step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

fn check(ret: libc::c_int, what: &str) -> Result<(), JailError> {
    if ret < 0 {
        Err(JailError::Step {
            step: what.to_string(),
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| JailError::Step {
        step: format!("path {}", p.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// Checks a jail id: 1-64 letters, digits, `-` and `_`.
pub fn check_id(id: &str) -> Result<(), JailError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(JailError::BadId(id.to_string()))
    }
}

/// `path` made absolute against the current directory, `.` and `..`
/// resolved by name.
pub fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

// ----- cgroups -------------------------------------------------------------

/// The cgroup directories made for the jail.
struct Cgroups {
    dirs: Vec<PathBuf>,
}

/// Mounted cgroup hierarchies: (mount point, fstype, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mnt = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1).unwrap_or("");
            fstype
                .starts_with("cgroup")
                .then(|| (PathBuf::from(mnt), fstype.to_string(), opts.to_string()))
        })
        .collect()
}

/// This process's cgroup path in the v1 hierarchy of `controller`.
fn own_v1_path(controller: &str) -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for l in text.lines() {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        if ctrls.is_some_and(|c| c.split(',').any(|c| c == controller)) {
            return PathBuf::from(path.unwrap_or("/").trim_start_matches('/'));
        }
    }
    PathBuf::new()
}

fn write_file(path: &Path, value: &str) -> Result<(), JailError> {
    fs::write(path, value).map_err(step(format!("writing {value:?} to {}", path.display())))
}

/// `MAJ:MIN key=N ...` checked.
fn parse_io(spec: &str) -> Result<(String, Vec<(String, u64)>), JailError> {
    let bad = || {
        JailError::Limit(format!(
            "--jail-io {spec:?}: expected MAJ:MIN followed by rbps=N, wbps=N, riops=N or wiops=N"
        ))
    };
    let mut parts = spec.split_whitespace();
    let dev = parts.next().ok_or_else(bad)?;
    let (maj, min) = dev.split_once(':').ok_or_else(bad)?;
    if maj.parse::<u32>().is_err() || min.parse::<u32>().is_err() {
        return Err(bad());
    }
    let mut limits = Vec::new();
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(bad)?;
        if !["rbps", "wbps", "riops", "wiops"].contains(&k) {
            return Err(bad());
        }
        limits.push((k.to_string(), v.parse().map_err(|_| bad())?));
    }
    if limits.is_empty() {
        return Err(bad());
    }
    Ok((dev.to_string(), limits))
}

impl Cgroups {
    /// Makes the jail's cgroups: v2 when the unified hierarchy offers every
    /// controller the limits need (under `vmm-kit/ID` at its root), else v1
    /// (under this process's own cgroup of each controller, so the jail
    /// stays inside its launcher's limits).
    fn create(spec: &JailSpec) -> Result<Self, JailError> {
        let io: Vec<_> = spec
            .io
            .iter()
            .map(|s| parse_io(s))
            .collect::<Result<_, _>>()?;
        let mut wanted: Vec<&'static str> = Vec::new();
        if spec.cpus.is_some() {
            wanted.push("cpu");
        }
        if spec.memory.is_some() {
            wanted.push("memory");
        }
        if !io.is_empty() {
            wanted.push("io");
        }
        if wanted.is_empty() {
            return Ok(Self { dirs: Vec::new() });
        }
        if let Some(cpus) = spec.cpus {
            if !(cpus > 0.0 && cpus <= 4096.0) {
                return Err(JailError::Limit(format!(
                    "--jail-cpus {cpus}: a number of CPUs above 0"
                )));
            }
        }
        let quota = spec
            .cpus
            .map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000));
        let mounts = cgroup_mounts();
        let v2 = mounts
            .iter()
            .find(|(_, t, _)| t == "cgroup2")
            .map(|(m, _, _)| m.clone());
        if let Some(root) = v2 {
            let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if wanted
                .iter()
                .all(|w| offered.split_whitespace().any(|o| o == *w))
            {
                let enable: String = wanted.iter().map(|w| format!("+{w} ")).collect();
                let parent = root.join("vmm-kit");
                fs::DirBuilder::new()
                    .recursive(true)
                    .create(&parent)
                    .map_err(step(format!("creating {}", parent.display())))?;
                write_file(&root.join("cgroup.subtree_control"), enable.trim())?;
                write_file(&parent.join("cgroup.subtree_control"), enable.trim())?;
                let dir = parent.join(&spec.id);
                fs::create_dir(&dir).map_err(step(format!("creating {}", dir.display())))?;
                let made = Self {
                    dirs: vec![dir.clone()],
                };
                if let Some(q) = quota {
                    write_file(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
                }
                if let Some(m) = spec.memory {
                    write_file(&dir.join("memory.max"), &m.to_string())?;
                }
                for (dev, limits) in &io {
                    let l: Vec<String> = limits.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    write_file(&dir.join("io.max"), &format!("{dev} {}", l.join(" ")))?;
                }
                return Ok(made);
            }
        }
        let mut made = Self { dirs: Vec::new() };
        for w in wanted {
            let v1 = if w == "io" { "blkio" } else { w };
            let (mnt, _, _) = mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|o| o == v1))
                .ok_or(JailError::NoController(w))?;
            let dir = mnt.join(own_v1_path(v1)).join("vmm-kit").join(&spec.id);
            fs::DirBuilder::new()
                .recursive(true)
                .create(&dir)
                .map_err(step(format!("creating {}", dir.display())))?;
            made.dirs.push(dir.clone());
            match w {
                "cpu" => {
                    write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_file(
                        &dir.join("cpu.cfs_quota_us"),
                        &quota.unwrap_or(0).to_string(),
                    )?;
                }
                "memory" => {
                    write_file(
                        &dir.join("memory.limit_in_bytes"),
                        &spec.memory.unwrap_or(0).to_string(),
                    )?;
                }
                _ => {
                    for (dev, limits) in &io {
                        for (k, v) in limits {
                            let file = match k.as_str() {
                                "rbps" => "blkio.throttle.read_bps_device",
                                "wbps" => "blkio.throttle.write_bps_device",
                                "riops" => "blkio.throttle.read_iops_device",
                                _ => "blkio.throttle.write_iops_device",
                            };
                            write_file(&dir.join(file), &format!("{dev} {v}"))?;
                        }
                    }
                }
            }
        }
        Ok(made)
    }

    fn add(&self, pid: libc::pid_t) -> Result<(), JailError> {
        for d in &self.dirs {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn remove(&self) {
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
            if let Some(parent) = d.parent() {
                // The shared parent goes once no jail uses it.
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

// ----- the launcher ----------------------------------------------------------

static CHILD: AtomicI32 = AtomicI32::new(0);
static FORWARDED: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    FORWARDED.store(signal, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe; it passes no memory.
        unsafe { libc::kill(child, signal) };
    }
}

extern "C" fn end_by(signal: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

/// The signal the launcher forwarded last, if any.
pub fn forwarded_signal() -> Option<i32> {
    match FORWARDED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Makes the jail and forks the VMM into it. Returns [`Role::Jailed`] in
/// the VMM, and [`Role::Launcher`] with the VMM's wait status in the
/// launcher once the VMM has ended and the jail is cleaned up.
pub fn enter(spec: &JailSpec) -> Result<Role, JailError> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    if spec.uid == 0 || spec.gid == 0 {
        return Err(JailError::RootUser);
    }
    check_id(&spec.id)?;
    for b in &spec.binds {
        if b.output && fs::symlink_metadata(&b.path).is_err() {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&b.path)
                .map_err(|source| JailError::Bind {
                    path: b.path.clone(),
                    source,
                })?;
            std::os::unix::fs::chown(&b.path, Some(spec.uid), Some(spec.gid)).map_err(
                |source| JailError::Bind {
                    path: b.path.clone(),
                    source,
                },
            )?;
        }
        fs::metadata(&b.path).map_err(|source| JailError::Bind {
            path: b.path.clone(),
            source,
        })?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&spec.base)
        .map_err(step(format!("creating {}", spec.base.display())))?;
    let dir = spec.base.join(&spec.id);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(JailError::InUse(dir)),
        Err(e) => return Err(step(format!("creating {}", dir.display()))(e)),
    }
    let root = dir.join("root");
    let result = launch(spec, &root);
    let _ = fs::remove_dir(&root);
    if matches!(result, Err(_) | Ok(Role::Launcher(_))) {
        let _ = fs::remove_dir(&dir);
    }
    result
}

fn launch(spec: &JailSpec, root: &Path) -> Result<Role, JailError> {
    fs::create_dir(root).map_err(step(format!("creating {}", root.display())))?;
    let cgroups = Cgroups::create(spec);
    let cgroups = match cgroups {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir(root);
            return Err(e);
        }
    };
    let netns = match &spec.netns {
        Some(p) => Some(
            fs::File::open(p)
                .map_err(step(format!("opening network namespace {}", p.display())))?,
        ),
        None => None,
    };
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is an array of two descriptors for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(r, "pipe")?;
    // SAFETY: pipe2 just returned these two descriptors, owned from here.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: unshare with a flag and no memory; this process is still
    // single-threaded.
    let r = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    check(r, "new PID namespace")?;
    // SAFETY: fork in a single-threaded process; the child only continues
    // this function's work.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        cgroups.remove();
        return Err(step("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(tx);
        let mut go = [0u8; 1];
        let mut rx = fs::File::from(rx);
        if rx.read_exact(&mut go).is_err() || go[0] != b'g' {
            // SAFETY: _exit ends the child without running the parent's
            // destructors twice.
            unsafe { libc::_exit(1) };
        }
        drop(rx);
        if let Err(e) = confine(spec, root, netns.as_ref().map(|f| f.as_raw_fd())) {
            eprintln!("error: {e}");
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
        return Ok(Role::Jailed);
    }
    drop(rx);
    drop(netns);
    CHILD.store(pid, Ordering::SeqCst);
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe
        // functions.
        unsafe { libc::signal(s, forward as *const () as libc::sighandler_t) };
    }
    let joined = cgroups.add(pid);
    let mut tx = fs::File::from(tx);
    if joined.is_ok() {
        let _ = tx.write_all(b"g");
    }
    drop(tx);
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child into a local int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || (r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            break;
        }
    }
    cgroups.remove();
    joined?;
    Ok(Role::Launcher(status))
}

// ----- the jailed side ---------------------------------------------------------

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    // SAFETY: every pointer is a NUL-terminated string that lives across
    // the call, or null.
    let r = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(r, &format!("mounting {}", target.display()))
}

fn mknod(
    path: &Path,
    major: u32,
    minor: u32,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    let c = cstr(path)?;
    // SAFETY: a NUL-terminated path and plain integers.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    };
    check(r, &format!("creating {}", path.display()))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(step(format!("chown {}", path.display())))?;
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(step(format!("chmod {}", path.display())))
}

fn mkdirs(path: &Path) -> Result<(), JailError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(step(format!("creating {}", path.display())))
}

/// In the forked VMM: namespaces, the new root, descriptors, the user.
fn confine(spec: &JailSpec, root: &Path, netns: Option<RawFd>) -> Result<(), JailError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if netns.is_none() {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with flags and no memory.
    check(unsafe { libc::unshare(flags) }, "new namespaces")?;
    if let Some(fd) = netns {
        // SAFETY: setns on a namespace descriptor this process holds.
        let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        check(r, "joining the network namespace")?;
    }
    let host = CString::new(spec.id.clone()).unwrap_or_default();
    // SAFETY: a pointer and length of a live buffer.
    let r = unsafe { libc::sethostname(host.as_ptr(), spec.id.len()) };
    check(r, "hostname")?;
    // Nothing mounted from here on reaches the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("size=1m,mode=0755"),
    )?;
    mkdirs(&root.join("dev/net"))?;
    mknod(&root.join("dev/kvm"), 10, 232, 0o660, spec.uid, spec.gid)?;
    mknod(&root.join("dev/null"), 1, 3, 0o666, 0, 0)?;
    mknod(&root.join("dev/urandom"), 1, 9, 0o666, 0, 0)?;
    if Path::new("/dev/net/tun").exists() {
        mknod(
            &root.join("dev/net/tun"),
            10,
            200,
            0o660,
            spec.uid,
            spec.gid,
        )?;
    }
    for b in &spec.binds {
        let inside = root.join(b.path.strip_prefix("/").unwrap_or(&b.path));
        let meta = fs::metadata(&b.path).map_err(|source| JailError::Bind {
            path: b.path.clone(),
            source,
        })?;
        if let Some(parent) = inside.parent() {
            mkdirs(parent)?;
        }
        if meta.is_dir() {
            mkdirs(&inside)?;
        } else if fs::symlink_metadata(&inside).is_err() {
            fs::File::create(&inside).map_err(step(format!("creating {}", inside.display())))?;
        }
        mount(Some(&b.path), &inside, None, libc::MS_BIND, None)?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
        if !meta.file_type().is_block_device() {
            flags |= libc::MS_NODEV;
        }
        if !b.writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &inside, None, flags, None)?;
    }
    // Relative paths keep working: the same directory exists inside.
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    mkdirs(&root.join(cwd.strip_prefix("/").unwrap_or(&cwd)))?;
    let old = root.join(".old");
    mkdirs(&old)?;
    let (r, o) = (cstr(root)?, cstr(&old)?);
    // SAFETY: pivot_root with two NUL-terminated paths.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, r.as_ptr(), o.as_ptr()) as libc::c_int };
    check(r, "pivot_root")?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    let old_c = cstr(Path::new("/.old"))?;
    // SAFETY: a NUL-terminated path.
    let r = unsafe { libc::umount2(old_c.as_ptr(), libc::MNT_DETACH) };
    check(r, "detaching the old root")?;
    fs::remove_dir("/.old").map_err(step("removing /.old"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )?;
    std::env::set_current_dir(&cwd).map_err(step(format!("chdir {}", cwd.display())))?;

    // Every descriptor but stdio and the one kept.
    let first_closed = match spec.keep_fd {
        Some(fd) => {
            if fd != 3 {
                // SAFETY: duplicating a descriptor this process holds onto 3.
                let r = unsafe { libc::dup2(fd, 3) };
                check(r, "moving the API socket to descriptor 3")?;
            }
            4
        }
        None => 3,
    };
    // SAFETY: closing descriptors by number; none is used afterwards.
    let r = unsafe { libc::close_range(first_closed, u32::MAX, 0) };
    check(r, "closing descriptors")?;

    // SAFETY: plain integer arguments; a null list of zero groups.
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()),
            "dropping supplementary groups",
        )?;
        check(
            libc::setresgid(spec.gid, spec.gid, spec.gid),
            "setting the group",
        )?;
        check(
            libc::setresuid(spec.uid, spec.uid, spec.uid),
            "setting the user",
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "no new privileges",
        )?;
        check(
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
            "not dumpable",
        )?;
    }
    // As PID 1 of its namespace, the VMM would ignore signals without a
    // handler: until the VM installs its own, they end it.
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a handler that only calls _exit.
        unsafe { libc::signal(s, end_by as *const () as libc::sighandler_t) };
    }
    Ok(())
}
